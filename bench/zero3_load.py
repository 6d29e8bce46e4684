"""Benchmark: what one rank holds after loading the model, under ZeRO-2 and under ZeRO-3 with zero3_init_flag.

Two processes each load the ``bench_load`` preset (a Qwen2.5-0.5B-sized LLM, fp32 on CPU) the way a training
run does (Accelerator with the DeepSpeed plugin, the backend configured, then ``load_model``), and report their
peak RSS and the parameter bytes they hold. Under ZeRO-3 transformers builds the model inside
``deepspeed.zero.Init``, so each rank materialises only its shard of each weight. Resident memory is split into
anonymous (the process's own tensors) and file-backed (pages of the memory-mapped safetensors file: page cache,
shared by the ranks and reclaimable): an fp32 checkpoint loaded in fp32 stays mapped, untouched pages unread.

    python bench/zero3_load.py
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODEL = common.ROOT / "runs" / "bench-load-model"
CONFIGS = {"ZeRO-2": "accelerate_config.yaml", "ZeRO-3 (zero3_init_flag)": "accelerate_config_zero3.yaml"}


def child() -> None:
    """One rank: load as training does, then print what it holds."""
    sys.path.insert(0, str(common.ROOT))
    from accelerate.utils import gather_object

    from llava_loop.backends import backend_for
    from llava_loop.config import load_config
    from llava_loop.launch import exit_process
    from llava_loop.memory import held_weight_bytes
    from llava_loop.runtime import load_model, make_accelerator

    cfg = load_config(None, ["data.path=x", f"model.path={MODEL}"])
    accelerator = make_accelerator(cfg)
    backend = backend_for(accelerator)
    backend.configure(cfg)  # ZeRO-3's bucket sizes, which zero.Init reads while the model is built
    model, _ = load_model(MODEL, dtype=backend.weights_dtype())
    held = held_weight_bytes(model)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    row = {
        "rank": accelerator.process_index,
        "held_mib": held / 2**20,
        "params": total,
        "anon_mib": int(status["RssAnon"].split()[0]) / 1024,
        "file_mib": int(status["RssFile"].split()[0]) / 1024,
        "partitioned": all(hasattr(p, "ds_id") for p in model.parameters()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    rows = gather_object([row])
    if accelerator.is_main_process:
        print(json.dumps({"rows": rows}))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    exit_process(0)  # as train.py ends (llava_loop/launch.py)


def main() -> None:
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.demo.tiny import build_tiny

    if not (MODEL / "config.json").is_file():
        build_tiny(MODEL, "bench_load")
    table = []
    for name, config in CONFIGS.items():
        out = common.run_child(
            [
                common.python(),
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                config,
                "--num_processes",
                "2",
                __file__,
                "--child",
            ]
        )
        if out["returncode"]:
            raise SystemExit(f"{name} failed:\n{out['stderr'][-3000:]}")
        for row in common.last_json_line(out["stdout"])["rows"]:
            table.append(
                [
                    name,
                    row["rank"],
                    f"{row['params']:,}",
                    "yes" if row["partitioned"] else "no",
                    f"{row['held_mib']:,.0f}",
                    f"{row['anon_mib']:,.0f}",
                    f"{row['file_mib']:,.0f}",
                    f"{row['peak_rss_mib']:,.0f}",
                ]
            )
    print(common.header("Loading under ZeRO-2 and ZeRO-3, 2 processes", "python bench/zero3_load.py"))
    print(
        common.table(
            [
                "backend",
                "rank",
                "parameters",
                "partitioned at load",
                "weights held (MiB)",
                "anonymous RSS after load (MiB)",
                "file-backed RSS (MiB)",
                "peak RSS (MiB)",
            ],
            table,
        )
    )


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
