"""Benchmark 5, the GPU checks: the real launch (`accelerate launch` + DeepSpeed ZeRO-2 + bf16, `train.py`) on
random-weight CLIP-L/14-336 + Qwen2.5-0.5B- and 3B-shaped towers (configs written here, nothing downloaded),
over synthetic LLaVA-pretrain-like shapes data at 336 px. The `anyres` shape is a LLaVA-NeXT build of the 0.5B
pair (the default pinpoints) over the same data stretched to 672x336 and 1008x336, mixed: a base view plus 2 or 3
tiles, 1,752 or 2,328 image tokens a sample.

For each shape, mode (`projector`, `lora`) and gradient checkpointing (off, on) one launch, in its own
processes so memory is freed between them, reports samples/s, tokens/s, peak GPU memory and MFU counted
two ways (llava_loop/flops.py):
* "needed": the FLOPs the step must compute, as the run itself logs them each step (`flops` in metrics.jsonl,
  from its real token counts): the vision layers used, the LLM forward and its backward to the inputs (to the
  weights only where they train), LoRA adapters, the LM head at supervised positions only;
* "6N": 6 x the non-embedding parameters each token passes through (comparable with published MFU).
Recomputation (checkpointing, the chunked loss) is not counted as useful work in either.

    python bench/gpu.py                          # on a GPU machine: every shape, mode and checkpointing setting
    python bench/gpu.py --shapes 0.5b --modes projector --checkpointing off
    python bench/gpu.py --shapes anyres --modes projector --checkpointing off   # the tiled row alone
    python bench/gpu.py --smoke                  # CPU: tiny shapes through the same launch path, measures nothing
    python bench/gpu.py --budget-minutes 6 --out results/   # starts no launch the time left cannot fit
    python bench/gpu.py --zero 3 --shapes 7b --modes freeze_vision --micro-batch 8
                                                 # ZeRO-3 (partitioned load, NCCL, bf16) at Qwen2.5-7B's shape

Targets on one H100/H200 at micro-batch 32 (about 600 tokens a sample): stage 1 (`projector`) with the 0.5B
shape at MFU >= 35% of needed FLOPs (about 255 samples/s on an H100/H200 by llava_loop/flops.py at 640 tokens a
sample); with the 3B shape >= 35 samples/s (35% MFU there would be about 45).

The two target rows run first (0.5B then 3B, `projector`, checkpointing off, plain kernels), then the anyres one at
the same settings, then the 0.5B one with Liger's kernels and with compiled decoder layers where `--kernels` asks for
them, then the rest. A launch that fails (out of memory, say) is recorded with its reason and the tail of its
stderr, and the bench goes on; the table of whatever ran is printed at the end, also when the time budget runs out
or the bench is stopped with SIGTERM.
The exit status is 1 when a launch failed. Launched ranks keep the caller's PYTHONPATH (carried wheels on the GPU
machine: bench/device.sh).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = {("0.5b", "projector"): "MFU (needed) >= 35%", ("3b", "projector"): ">= 35 samples/s"}
# --shapes: (the LLM shape tower_configs builds, the architecture); --smoke swaps in the tiny twin of each arch
SHAPES = {
    "0.5b": ("0.5b", "llava"),
    "3b": ("3b", "llava"),
    "7b": ("7b", "llava"),
    "anyres": ("0.5b", "llava-next"),
    "tiny": ("tiny", "llava"),
    "tiny-anyres": ("tiny", "llava-next"),
}
SMOKE_TWINS = {"llava": "tiny", "llava-next": "tiny-anyres"}
WIDE = ((672, 336), (1008, 336))  # the anyres images, alternating: LLaVA-NeXT's 1x2 and 1x3 grids
# the target rows, measured before anything else; then the tiled row; then what Liger's kernels and compiled
# layers do to the first
FIRST = [
    ("0.5b", "projector", "off", "plain"),
    ("3b", "projector", "off", "plain"),
    ("anyres", "projector", "off", "plain"),
    ("0.5b", "projector", "off", "liger"),
    ("0.5b", "projector", "off", "compile"),
]
KERNELS = {
    "plain": {"liger": "off", "compile": False},
    "liger": {"liger": "on", "compile": False},
    "compile": {"liger": "off", "compile": True},
}  # train.* settings of each --kernels choice


def tower_configs(shape: str):
    """CLIP-L/14-336 and a Qwen2.5-shaped LLM (published sizes), or tiny towers at the same geometry for --smoke."""
    from transformers import CLIPVisionConfig, Qwen2Config

    from llava_loop.memory import clip_l_336

    if shape == "tiny":
        vision = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            projection_dim=64,
        )
        return vision, Qwen2Config(
            vocab_size=151_936,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    vision = clip_l_336()
    llm = {
        "0.5b": dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "3b": dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        # the ZeRO-3 check (--zero 3 --shapes 7b): loaded partitioned, its peak GPU memory against llava_loop.memory
        "7b": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    }[shape]
    return vision, Qwen2Config(
        vocab_size=151_936, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, **llm
    )


def build_random_model(out: Path, shape: str) -> None:
    """Random-weight towers and the tiny tokenizer (Qwen's special tokens, ChatML) composed into a LLaVA dir (a
    LLaVA-NeXT one for anyres, tiled as `llava-loop build --arch llava-next` tiles). The weights are drawn on the GPU
    where there is one (a 3B model takes minutes on the CPU) and freed once saved."""
    import torch

    from llava_loop.anyres import tiling_for
    from llava_loop.build import add_image_token, compose_config, make_processor, model_class, save_model_dir
    from llava_loop.demo.families import LLM_FAMILIES, make_tokenizer
    from llava_loop.llm import generation_config
    from llava_loop.vision_tower import CLIP, VisionTower, load_image_processor

    llm, arch = SHAPES[shape]
    vision, text = tower_configs(llm)
    tiling = tiling_for(arch, vision.image_size)
    tokenizer = make_tokenizer(LLM_FAMILIES["qwen2"])
    image_id, pad_id = add_image_token(tokenizer), tokenizer.pad_token_id
    torch.manual_seed(0)
    dtype = torch.float32 if llm == "tiny" else torch.bfloat16
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = model_class(arch)(compose_config(vision, text, image_id, pad_id, tiling=tiling))
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.dtype = dtype
    model.generation_config = generation_config(tokenizer, out, text)
    image_processor, source = load_image_processor(out, CLIP, vision)  # no preprocessor file: CLIP defaults at 336
    tower = VisionTower(out, CLIP, vision, image_processor, source)
    save_model_dir(model, make_processor(tower, tokenizer, tiling), out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the launches need the memory, not this process


def flops_model(model_dir: Path):
    """The FLOPs model of a composed model dir, built on the meta device (no memory, no weights read); its 6N does
    not depend on the mode."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from llava_loop.flops import FlopsModel

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    return FlopsModel.from_model(model, "projector")


def write_data(out: Path, n: int, arch: str) -> Path:
    """`n` shapes records at 336 px; for a tiled arch each image stretched to the next of WIDE."""
    from PIL import Image

    from llava_loop.demo.shapes import write_shapes

    write_shapes(out, n, seed=0, size=336)
    if arch != "llava":
        for i, path in enumerate(sorted((out / "images").iterdir())):
            Image.open(path).resize(WIDE[i % len(WIDE)]).save(path, quality=92)
    return out


def views_per_sample(model_dir: Path, data: Path) -> float:
    """The tower views a sample costs on average, by the model's own processor over the images written (one per
    record): the run's metrics log no view counts, and the 6N count needs them."""
    from PIL import Image
    from transformers import AutoProcessor

    from llava_loop.data.tiles import Tiler

    tiler = Tiler.of(AutoProcessor.from_pretrained(model_dir))
    if tiler is None:
        return 1.0
    sizes = [Image.open(path).size for path in (data / "images").iterdir()]
    views = {size: tiler.view_count(*size) for size in set(sizes)}
    return sum(views[size] for size in sizes) / len(sizes)


def micro_batch(arch: str, args) -> int:
    """A tiled sample here holds about 3x a base-resolution one's tokens: half the micro-batch keeps a step's
    activations within 2x of the target row's."""
    return args.micro_batch if arch == "llava" else max(1, args.micro_batch // 2)


class PeakMemory:
    """A hook for the launched run: the peak GPU memory of every process, written at the end of training."""

    def on_step_end(self, trainer, metrics):
        import torch

        if metrics["step"] == 2 and torch.cuda.is_available():  # after warm-up; the peak of the steady state
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer):
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        rank = trainer.accelerator.process_index
        (Path(trainer.output_dir) / f"peak_memory_{rank}.json").write_text(json.dumps({"peak_gib": peak}))


class LaunchFailed(Exception):
    """A launch that exited non-zero or ran out of time: a short reason and the tail of its stderr."""

    def __init__(self, reason: str, stderr_tail: str = ""):
        super().__init__(reason)
        self.reason, self.stderr_tail = reason, stderr_tail


WHY = re.compile(r"\b\w*(Error|Exception)\b:|^error:")
LAUNCHER = re.compile(r"ChildFailedError|torch[./]distributed[./]elastic")  # the launcher reporting a rank's exit


def failure_reason(stderr: str) -> str:
    """One line that says why a launch failed: out of memory where it was, else a rank's last error line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not LAUNCHER.search(line)]
    memory = [line for line in lines if "out of memory" in line.lower() or "OutOfMemoryError" in line]
    if memory:
        return "out of memory: " + memory[-1][:300]
    errors = [line for line in lines if WHY.search(line)]
    return (errors or lines or ["no stderr"])[-1][:300]


def launch(
    model_dir: Path,
    data: Path,
    out: Path,
    shape: str,
    mode: str,
    checkpointing: bool,
    kernels: str,
    args,
    timeout: float,
) -> dict:
    """One real training launch; returns its measured figures, or raises LaunchFailed."""
    arch = SHAPES[shape][1]
    config = {
        "mode": mode,
        "output_dir": str(out),
        "resume": "none",
        "model": {"path": str(model_dir)},
        "hooks": ["gpu:PeakMemory"],
        "data": {
            "path": str(data / "chat.json"),
            "image_dir": str(data / "images"),
            "num_workers": args.workers,
            "max_length": 1024 if arch == "llava" else 4096,  # LLaVA-NeXT trains at 4096
        },
        "train": {
            "micro_batch_size": micro_batch(arch, args),
            "grad_accum": 1,
            "max_steps": args.steps,
            "lr": 1e-3 if mode == "projector" else 2e-4,
            "warmup_ratio": 0.03,
            "log_every": 1,
            "gradient_checkpointing": checkpointing,
            "precision": "fp32" if args.smoke else "bf16",
            **KERNELS[kernels],
        },
        "lora": {"r": 64, "alpha": 128},
        "checkpoint": {"every": 0, "keep_last": 1},
        "eval": {"every": 0},
    }
    out.mkdir(parents=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(config))
    accelerate_config = "accelerate_config_zero3.yaml" if args.zero == 3 else "accelerate_config.yaml"
    cmd = [
        common.python(),
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(common.ROOT / accelerate_config),
        "--num_processes",
        str(args.processes),
        "--main_process_port",
        str(args.port),
        "train.py",
        "--config",
        str(out.parent / f"{out.name}.yaml"),
    ]
    # the caller's PYTHONPATH stays: on the GPU machine it holds the carried wheels (deepspeed, transformers)
    caller = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    path = [str(common.ROOT / "bench"), str(common.ROOT), *filter(None, caller)]
    env = {"PYTHONPATH": os.pathsep.join(path), "TOKENIZERS_PARALLELISM": "false"}
    run = common.run_child(cmd, env=env, check=False, timeout=timeout)
    if run["timed_out"]:
        raise LaunchFailed(f"stopped after {timeout:.0f} s (time budget or --launch-timeout)", run["stderr"][-4000:])
    if run["returncode"] != 0:
        raise LaunchFailed(f"exit {run['returncode']}: {failure_reason(run['stderr'])}", run["stderr"][-4000:])
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]
    steady = steps[2:] or steps  # the first steps compile kernels and fill the loader
    seconds = common.median([m["step_time"] for m in steady])
    samples = micro_batch(arch, args) * args.processes
    tokens = common.median([m["tokens_per_s"] * m["step_time"] for m in steady])
    supervised = common.median([m["label_tokens"] for m in steady])
    flops = common.median([m["flops"] for m in steady])  # the step's needed FLOPs, as the loop counts them
    peaks = [json.loads(p.read_text())["peak_gib"] for p in sorted(out.glob("peak_memory_*.json"))]
    return {
        "shape": shape,
        "mode": mode,
        "checkpointing": checkpointing,
        "kernels": kernels,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_sample": tokens / samples,
        "supervised": supervised,
        "flops": flops,
        "peak_gib": max(peaks),
    }


def plan(
    shapes: list[str], modes: list[str], checkpointing: list[str], kernels: list[str]
) -> list[tuple[str, str, str, str]]:
    """Every (shape, mode, checkpointing, kernels) asked for, the FIRST rows first, the rest in the order given."""
    rows = [(shape, mode, ckpt, k) for shape in shapes for mode in modes for ckpt in checkpointing for k in kernels]
    return sorted(rows, key=lambda row: FIRST.index(row) if row in FIRST else len(FIRST))


def table(rows: list[dict]) -> str:
    def cells(r):
        if r["status"] != "ok":
            return ["—"] * 6
        return [
            f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_sample']:.0f}",
            f"{r['peak_gib']:.1f}",
            f"{r['mfu_needed']:.1%}",
            f"{r['mfu_6n']:.1%}",
        ]

    return common.table(
        [
            "shape",
            "mode",
            "checkpointing",
            "samples/s",
            "tokens/s",
            "tokens/sample",
            "peak GPU memory (GiB)",
            "MFU (needed)",
            "MFU (6N)",
            "kernels",
            "target",
            "status",
        ],
        [
            [
                r["shape"],
                r["mode"],
                "on" if r["checkpointing"] else "off",
                *cells(r),
                r["kernels"],
                TARGETS.get((r["shape"], r["mode"]), ""),
                "ok" if r["status"] == "ok" else f"{r['status']}: {r['reason']}",
            ]
            for r in rows
        ],
    )


def main() -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU through the same launch: checks, measures nothing"
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["0.5b", "3b", "anyres"],
        choices=[shape for shape in SHAPES if not shape.startswith("tiny")],
        help="LLM shapes with CLIP-L; anyres: LLaVA-NeXT tiles at the 0.5B shape",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["projector", "lora"],
        help="training modes, one launch each (train.py checks the names)",
    )
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        choices=["off", "on"],
        help="default: off and on; with --smoke, on (off is the path every test trains through)",
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=list(KERNELS),
        default=["plain"],
        help="plain, Liger's (train.liger=on) or compiled decoder layers (train.compile), one launch each",
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=0, help="GPUs to launch on (default: all visible)")
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument(
        "--zero",
        type=int,
        default=2,
        choices=[2, 3],
        help="DeepSpeed stage: 3 launches accelerate_config_zero3.yaml (NCCL + bf16 ZeRO-3 check)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        help="wall time for the whole bench: no launch starts that the time left cannot fit (judged by "
        "the longest launch so far), and a running one is stopped when it runs out",
    )
    parser.add_argument("--launch-timeout", type=float, default=1800, help="seconds before one launch is stopped")
    parser.add_argument("--out", type=Path, help="also write rows.jsonl (each row as it ends) and table.md here")
    args = parser.parse_args()
    args.checkpointing = args.checkpointing or (["on"] if args.smoke else ["off", "on"])
    # SIGTERM (a timeout around this script) ends it through the finally below, which prints what ran
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(common.ROOT))
    import torch

    from llava_loop.flops import peak_tflops

    if args.smoke:
        args.shapes = list(dict.fromkeys(SMOKE_TWINS[SHAPES[shape][1]] for shape in args.shapes))
        args.steps, args.micro_batch, args.workers, args.processes = 3, 2, 0, 1
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU here; use --smoke to check the script on CPU")
    args.processes = args.processes or torch.cuda.device_count()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.jsonl").write_text("")
    root = Path(tempfile.mkdtemp(prefix="llava-gpu-bench-"))
    data = {
        arch: write_data(root / f"data-{arch}", (args.steps + 1) * micro_batch(arch, args) * args.processes, arch)
        for arch in dict.fromkeys(SHAPES[shape][1] for shape in args.shapes)
    }
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    peak = args.peak_tflops or peak_tflops(name) or float("nan")
    deadline = started + 60 * args.budget_minutes if args.budget_minutes is not None else float("inf")
    rows, built, longest = [], {}, 0.0  # built: each shape's (FlopsModel, views per sample), or why it failed

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    try:
        for shape, mode, ckpt, kernels in plan(args.shapes, args.modes, args.checkpointing, args.kernels):
            row = {"shape": shape, "mode": mode, "checkpointing": ckpt == "on", "kernels": kernels}
            left = deadline - time.monotonic()
            if left <= longest:
                record(
                    {
                        **row,
                        "status": "skipped",
                        "reason": f"time budget ({max(left, 0):.0f} s left, the longest launch took {longest:.0f} s)",
                    }
                )
                continue
            t0 = time.monotonic()
            try:
                arch, model_dir = SHAPES[shape][1], root / f"model-{shape}"
                if isinstance(built.get(shape), LaunchFailed):  # its model could not be built: said once per row
                    raise built[shape]
                if shape not in built:
                    try:
                        build_random_model(model_dir, shape)
                        built[shape] = flops_model(model_dir), views_per_sample(model_dir, data[arch])
                    except Exception as exc:  # noqa: BLE001 - recorded for every row of this shape
                        built[shape] = LaunchFailed(f"building the {shape} model: {type(exc).__name__}: {exc}"[:300])
                        raise built[shape] from exc
                r = launch(
                    model_dir,
                    data[arch],
                    root / f"run-{shape}-{mode}-{ckpt}-{kernels}",
                    shape,
                    mode,
                    ckpt == "on",
                    kernels,
                    args,
                    timeout=min(args.launch_timeout, deadline - time.monotonic()),
                )
                flops, views = built[shape]
                samples = micro_batch(arch, args) * args.processes
                tokens = r["tokens_per_sample"] * samples
                # the data's mean views against the steps' median tokens: a mixed batch's views are not logged
                six_n = flops.step(views=samples * views, tokens=tokens, attention_pairs=0, supervised=0)[1]
                r["views_per_sample"] = views
                r["mfu_needed"] = r["flops"] / r["seconds"] / 1e12 / args.processes / peak
                r["mfu_6n"] = six_n / r["seconds"] / 1e12 / args.processes / peak
                record({**r, "status": "ok", "wall_s": time.monotonic() - t0})
            except LaunchFailed as exc:
                record(
                    {
                        **row,
                        "status": "failed",
                        "reason": exc.reason,
                        "wall_s": time.monotonic() - t0,
                        "stderr_tail": exc.stderr_tail,
                    }
                )
            except Exception as exc:  # noqa: BLE001 - a measuring bug in one row must not lose the others
                record(
                    {
                        **row,
                        "status": "failed",
                        "reason": f"{type(exc).__name__}: {exc}"[:300],
                        "wall_s": time.monotonic() - t0,
                    }
                )
            longest = max(longest, time.monotonic() - t0)
    finally:
        report = "\n".join(
            [
                common.header(
                    "GPU: CLIP-L/14-336 + Qwen2.5-shaped LLMs (anyres: LLaVA-NeXT tiles of 672x336 and 1008x336 "
                    f"images), accelerate launch + DeepSpeed ZeRO-{args.zero}, "
                    f"{'fp32 (smoke)' if args.smoke else 'bf16'} on {args.processes} x {name}",
                    "python bench/gpu.py " + " ".join(sys.argv[1:]),
                ),
                table(rows),
                "",
                f"{time.monotonic() - started:.0f} s in all",
            ]
        )
        print(report, flush=True)
        if args.out:
            (args.out / "table.md").write_text(report + "\n")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
