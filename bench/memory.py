"""Benchmark 4: peak memory per mode on bench_small, next to an estimate from parameter, gradient and
AdamW-state counts (fp32: 4 bytes for every weight, plus 4 for the gradient and 8 for the two moments of
every trainable weight). The rest of the measured peak is activations, the runtime and the data pipeline.

    python bench/memory.py --config configs/bench_small.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = ("projector", "lora", "freeze_vision", "full")


def counts(config: str, mode: str, lora_r: int) -> tuple[int, int]:
    from llava_loop.config import load_config
    from llava_loop.modes import apply_mode
    from llava_loop.parts import count_params
    from llava_loop.runtime import load_model

    cfg = load_config(common.ROOT / config, [f"mode={mode}", f"lora.r={lora_r}", f"lora.alpha={2 * lora_r}"])
    model, _ = load_model(cfg.model.path)
    model = apply_mode(model, cfg.canonical_mode, cfg.lora)
    return sum(count_params(model).values()), sum(count_params(model, trainable_only=True).values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.config import load_config
    from llava_loop.loop import run_setup

    run_setup(load_config(common.ROOT / args.config))
    rows = []
    for mode in MODES:
        total, trainable = counts(args.config, mode, args.lora_r)
        estimate = (4 * total + 12 * trainable) / 2**20
        run = common.run_child(
            [
                common.python(),
                "train.py",
                "--config",
                args.config,
                f"mode={mode}",
                f"lora.r={args.lora_r}",
                f"lora.alpha={2 * args.lora_r}",
                "data.num_workers=0",
                f"train.max_steps={args.steps}",
                f"output_dir={common.ROOT / 'runs' / f'bench-mem-{mode}'}",
            ]
        )
        rows.append(
            [
                mode,
                f"{trainable:,}",
                f"{total:,}",
                f"{estimate:.0f}",
                f"{run['peak_rss_mib']:.0f}",
                f"{run['peak_rss_mib'] - estimate:.0f}",
            ]
        )
    print(common.header("Memory per mode", "python bench/memory.py " + " ".join(sys.argv[1:])))
    print(
        "fp32 on CPU, one process, no workers, micro-batch 4 x accumulation 2; estimate = 4 B x all weights "
        "+ 12 B x trainable weights (gradient + AdamW m, v)\n"
    )
    print(common.table(["mode", "trainable", "total params", "estimate (MiB)", "peak RSS (MiB)", "rest (MiB)"], rows))
    print(json.dumps({r[0]: {"estimate": float(r[3]), "peak": float(r[4])} for r in rows}))


if __name__ == "__main__":
    main()
