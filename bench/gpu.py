"""Benchmark 5, the GPU checks: the real launch (`accelerate launch` + DeepSpeed ZeRO-2 + bf16, `train.py`) on
random-weight CLIP-L/14-336 + Qwen2.5-0.5B- and 3B-shaped towers (configs written here, nothing downloaded), over
synthetic data at 336 px: LLaVA-pretrain-like shapes captions (stage 1), a LLaVA-665K-like length mix (stage 2,
bench/batching.py's), the shapes stretched to 672x336 and 1008x336 for a LLaVA-NeXT build (AnyRes), and the video
demo's clips at 336 px as frame lists (32 frames each) for a OneVision build (video).

The plan is fixed before the call (PLAN, in order; docs/BENCHMARKS.md section 5 says why each row is there and how
the 3B row's settings were chosen). Each row is one launch, in its own processes, so memory is freed between them:

1. `0.5b`: stage 1 (`projector`) at micro-batch 32, plain kernels: the MFU target;
2. `0.5b-liger`, 3. `0.5b-compile`: the same with Liger's kernels, and with compiled decoder layers;
4. `3b`: stage 1 at the 3B shape, micro-batch 16 (32 does not fit an H100 without checkpointing): the samples/s
   target;
5. `stage2`: the 0.5B LLM trained (`freeze_vision`), padding-free micro-batches filled to a 16,384-token budget;
6. `anyres`: the 0.5B pair as LLaVA-NeXT, micro-batch 16;
7. `video`: the 0.5B pair as LLaVA-OneVision, `freeze_vision`, micro-batch 4 clips of 32 frames (4,609 video tokens
   each: 32 x 12 x 12 pooled patches + 1);
8. `3b-mb32`: the 3B row at micro-batch 32, which only an H200 holds.

Before each launch, the memory model (`llava_loop.memory`, as `llava-loop memory` prints it) predicts the row's peak
on the card found (`nvidia-smi`); a row it says will not fit is refused, not tried. A row whose predicted time does
not fit the time left is skipped; a launch that outruns the budget is stopped and what its steps measured is kept.
Every row is written to `--out` as it ends (rows.jsonl), and the table of what ran (table.md) is written also when
the budget runs out or the bench is stopped with SIGTERM.

Each row reports samples/s, tokens/s, the loop's own `mfu` (the FLOPs the step needs, llava_loop/flops.py, over the
card's dense bf16 peak), the median step time and its spread (the slowest over the fastest steady step), the peak
GPU memory allocated and reserved (the allocator's whole holding, what an out-of-memory error counts), its
prediction, and its loss after the warm-up (Liger's and the compiled row's must match the plain row's).

    python bench/gpu.py --dry-run                   # the plan: predicted GiB and minutes per row on H100 and H200
    python bench/gpu.py --out results/ --budget-minutes 6      # on a GPU machine (bench/device.sh runs this)
    python bench/gpu.py --rows 3b anyres --budget-minutes 4    # a named subset again
    python bench/gpu.py --smoke                     # CPU: each row's tiny twin through the same launch path
    python bench/gpu.py --smoke --card h100 --rows 3b-mb32     # the refusal, on a CPU: planned as for an H100

This process never touches CUDA: it reads the card from nvidia-smi, builds each model in a child process (on the
GPU, freed when it exits) and counts FLOPs on the meta device. Launched ranks keep the caller's PYTHONPATH (carried
wheels on the GPU machine: bench/device.sh) and run with the hub offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
STEPS, WARMUP = 10, 3  # steps per launch; the first WARMUP fill the loader, tune kernels and compile


@dataclass(frozen=True)
class Shape:
    llm: str  # a key of llava_loop.memory.LLMS, or "tiny"
    arch: str


SHAPES = {
    "0.5b": Shape("0.5B", "llava"),
    "3b": Shape("3B", "llava"),
    "anyres": Shape("0.5B", "llava-next"),
    "onevision": Shape("0.5B", "llava-onevision"),
    "tiny": Shape("tiny", "llava"),
    "tiny-anyres": Shape("tiny", "llava-next"),
    "tiny-onevision": Shape("tiny", "llava-onevision"),
}
TINY = {"llava": "tiny", "llava-next": "tiny-anyres", "llava-onevision": "tiny-onevision"}  # each arch's twin
VIDEO_FRAMES = 32  # data.video_frames of the video row: OneVision's default


@dataclass(frozen=True)
class Data:
    """What a data kind's micro-batch holds, for the predictions: mean tokens and padded length per sample (the
    tiny tokenizer's count of the records written here), views per sample, supervised tokens per sample."""

    tokens: float
    padded: int
    views: float
    supervised: float


DATA = {
    "stage1": Data(tokens=640, padded=700, views=1.0, supervised=35),
    "anyres": Data(tokens=2104, padded=2400, views=3.5, supervised=35),
    "stage2": Data(tokens=700, padded=2048, views=0.7, supervised=250),  # batching.write_mix's records
    "video": Data(tokens=4640, padded=4650, views=VIDEO_FRAMES, supervised=3),  # demo clips: a colour word
}


@dataclass(frozen=True)
class Row:
    name: str
    shape: str
    mode: str
    micro_batch: int
    data: str
    kernels: str = "plain"  # plain, liger (train.liger=on) or compile (train.compile)
    token_budget: int = 0  # data.max_tokens_per_micro_batch with data.padding_free; 0: micro_batch samples
    target: str = ""


PLAN = [
    Row("0.5b", "0.5b", "projector", 32, "stage1", target="MFU >= 35%"),
    Row("0.5b-liger", "0.5b", "projector", 32, "stage1", kernels="liger"),
    Row("0.5b-compile", "0.5b", "projector", 32, "stage1", kernels="compile"),
    Row("3b", "3b", "projector", 16, "stage1", target=">= 35 samples/s"),
    Row("stage2", "0.5b", "freeze_vision", 1, "stage2", token_budget=16384),
    Row("anyres", "anyres", "projector", 16, "anyres"),
    Row("video", "onevision", "freeze_vision", 4, "video"),
    Row("3b-mb32", "3b", "projector", 32, "stage1"),
]
ROWS = {row.name: row for row in PLAN}
WIDE = ((672, 336), (1008, 336))  # the anyres images, alternating: LLaVA-NeXT's 1x2 and 1x3 grids

# Cards the plan is made for: nvidia-smi's name and memory.total as seen on the lent machines (KINDS.md)
CARDS = {"h100": ("NVIDIA H100 80GB HBM3", 81559 / 1024), "h200": ("NVIDIA H200", 143771 / 1024)}

# The time model, before any GPU measurement (docs/BENCHMARKS.md section 5): a launch's fixed start (imports,
# DeepSpeed's engine, DataLoader workers), weights written by the builder and read by the launch at disk speed,
# Liger's Triton JIT and torch.compile's first graphs, steps at an assumed MFU, and the final checkpoint (written and
# hashed). The bench scales what is left by how far the rows so far ran over or under it.
SETUP_S = 45  # bench/device.sh before the first row: wheels, import check, data
BUILD_S = 15  # a builder child's imports and random init
LAUNCH_S = 35
DISK_BYTES_PER_S = 1e9
KERNEL_START_S = {"plain": 0, "liger": 20, "compile": 90}
ASSUMED_MFU = 0.30
TESTS_S = 120  # tests/test_gpu.py: three short runs, each in its own process, and the varlen kernel


def twin(row: Row) -> Row:
    """A row's CPU smoke twin: tiny towers at the same 336 px / 14 px geometry, 2 samples or 2,048 tokens."""
    shape = TINY[SHAPES[row.shape].arch]
    return replace(row, shape=shape, micro_batch=min(row.micro_batch, 2), token_budget=min(row.token_budget, 2048))


# ------------------------------------------------------------------------------------------------
# The card, and what each row is predicted to hold and take
# ------------------------------------------------------------------------------------------------


def detect_card() -> tuple[str, float] | None:
    """(name, GiB) of the first GPU by nvidia-smi, or None: no CUDA context is created here."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, mib = out.stdout.strip().splitlines()[0].rsplit(",", 1)
    return name.strip(), float(mib) / 1024


def memory_estimate(row: Row) -> dict[str, float]:
    """The row's GiB on one GPU by llava_loop.memory: its LLM shape, mode, micro-batch (or token budget, one packed
    row) at the data's padded length, checkpointing off, its kernels (compiled layers keep what plain ones do)."""
    from llava_loop import memory

    data = DATA[row.data]
    micro_batch, seq_len = (1, row.token_budget) if row.token_budget else (row.micro_batch, data.padded)
    return memory.estimate(
        memory.LLMS[SHAPES[row.shape].llm],
        row.mode,
        "zero2",
        gpus=1,
        micro_batch=micro_batch,
        seq_len=seq_len,
        views=max(1, round(data.views)),
        checkpointing=False,
        kernels="liger" if row.kernels == "liger" else "plain",
        padding_free=bool(row.token_budget),
    )


def refusal(row: Row, card: tuple[str, float] | None) -> str | None:
    """Why the memory model says ``row`` will not fit ``card``, or None."""
    from llava_loop import memory

    if card is None:
        return None
    parts = memory_estimate(row)
    if memory.fits(parts, card[1]):
        return None
    return (
        f"predicted {parts['total']:.1f} GiB, over the {card[1] * (1 - memory.HEADROOM):.1f} GiB usable of the "
        f"{card[1]:.1f} GiB {card[0]} (llava-loop memory; {memory.HEADROOM:.0%} left for fragmentation)"
    )


def composed_config(shape: str):
    """The LLaVA config of a bench shape, without a tokenizer: the image token takes the vocabulary's last id."""
    from llava_loop.anyres import tiling_for
    from llava_loop.build import compose_config

    vision, text = tower_configs(SHAPES[shape].llm)
    tiling = tiling_for(SHAPES[shape].arch, vision.image_size)
    video = text.vocab_size - 3 if SHAPES[shape].arch == "llava-onevision" else None
    return compose_config(vision, text, text.vocab_size - 1, text.vocab_size - 2, tiling=tiling, video_token_id=video)


def meta_model(config):
    """A composed config's model on the meta device (no memory, no weights): what its FLOPs and sizes are read off."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def predicted_seconds(row: Row, peak_tflops: float, *, built: bool) -> float:
    """The row's wall time: its model's build unless ``built``, the launch, its kernels' start, STEPS at
    ASSUMED_MFU of ``peak_tflops``, the final checkpoint (the trained tensors' bf16 weights, fp32 master and Adam
    moments, written and hashed)."""
    from llava_loop import memory
    from llava_loop.flops import FlopsModel

    model = meta_model(composed_config(row.shape))
    data, weights = DATA[row.data], 2 * sum(p.numel() for p in model.parameters())  # bf16, a tied head once
    samples = row.token_budget / data.tokens if row.token_budget else row.micro_batch
    tokens = samples * data.tokens
    needed = FlopsModel.from_model(model, row.mode).step(
        views=round(samples * data.views),
        tokens=round(tokens),
        attention_pairs=round(samples * data.tokens**2),
        supervised=round(samples * data.supervised),
    )
    trained = memory.trainable_params(memory.LLMS[SHAPES[row.shape].llm], row.mode)
    build = 0 if built else BUILD_S + weights / DISK_BYTES_PER_S
    step = needed / (peak_tflops * 1e12 * ASSUMED_MFU)
    save = 2 * 14 * trained / DISK_BYTES_PER_S
    return build + LAUNCH_S + weights / DISK_BYTES_PER_S + KERNEL_START_S[row.kernels] + STEPS * step + save


def plan_table(rows: list[Row]) -> str:
    """The plan as the dry run prints it: per row, predicted GiB and whether it fits, predicted minutes, on each
    card of CARDS."""
    from llava_loop.flops import peak_tflops

    cells, clock = [], {card: SETUP_S for card in CARDS}
    built = {card: set() for card in CARDS}
    for row in rows:
        gib = memory_estimate(row)["total"]
        line = [row.name, row.shape, row.mode, row.token_budget or row.micro_batch, row.kernels, f"{gib:.1f}"]
        for card, (name, total) in CARDS.items():
            why = refusal(row, (name, total))
            if why:
                line += ["refused", "—"]
                continue
            seconds = predicted_seconds(row, peak_tflops(name), built=row.shape in built[card])
            built[card].add(row.shape)
            clock[card] += seconds
            line += [f"{seconds / 60:.1f}", f"{clock[card] / 60:.1f}"]
        cells.append(line + [row.target])
    headers = ["row", "shape", "mode", "micro-batch (tokens)", "kernels", "predicted GiB"]
    for card in CARDS:
        headers += [f"{card.upper()} min", f"{card.upper()} cumulative"]
    note = (
        f"Cumulative minutes include {SETUP_S} s of setup before the first row; tests/test_gpu.py after the rows "
        f"is predicted at {TESTS_S / 60:.1f} min. GiB per row from llava-loop memory (ZeRO-2, 1 GPU, checkpointing "
        f"off); a row fits a card when it leaves 5% of the card free."
    )
    return common.table([*headers, "target"], cells) + "\n\n" + note


# ------------------------------------------------------------------------------------------------
# Building a random-weight model (in a child process) and its data
# ------------------------------------------------------------------------------------------------


def tower_configs(llm: str):
    """CLIP-L/14-336 and a Qwen2.5-shaped LLM (published sizes), or tiny towers at the same geometry for --smoke."""
    from transformers import CLIPVisionConfig, Qwen2Config

    from llava_loop import memory

    if llm == "tiny":
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
    shape = memory.LLMS[llm]
    text = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_dim // (shape.hidden // shape.heads),
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    )
    return memory.clip_l_336(), text


def build_random_model(out: Path, shape: str) -> None:
    """Random-weight towers and the tiny tokenizer (Qwen's special tokens, ChatML) composed into a LLaVA dir (a
    LLaVA-NeXT one for anyres, tiled as `llava-loop build --arch llava-next` tiles). Runs in a child process (--build):
    the weights are drawn on the GPU where there is one (a 3B model takes minutes on the CPU), and the GPU is free
    again when the child exits."""
    import torch

    from llava_loop.anyres import tiling_for
    from llava_loop.build import add_image_token, compose_config, make_processor, model_class, save_model_dir
    from llava_loop.demo.families import LLM_FAMILIES, make_tokenizer
    from llava_loop.llm import generation_config
    from llava_loop.template import VIDEO_TOKEN
    from llava_loop.vision_tower import CLIP, VisionTower, load_image_processor

    llm, arch = SHAPES[shape].llm, SHAPES[shape].arch
    vision, text = tower_configs(llm)
    tiling = tiling_for(arch, vision.image_size)
    tokenizer = make_tokenizer(LLM_FAMILIES["qwen2"])
    image_id, pad_id = add_image_token(tokenizer), tokenizer.pad_token_id
    video_id = add_image_token(tokenizer, VIDEO_TOKEN) if arch == "llava-onevision" else None
    torch.manual_seed(0)
    dtype = torch.float32 if llm == "tiny" else torch.bfloat16
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            config = compose_config(vision, text, image_id, pad_id, tiling=tiling, video_token_id=video_id)
            model = model_class(arch)(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.dtype = dtype
    model.generation_config = generation_config(tokenizer, out, text)
    image_processor, source = load_image_processor(out, CLIP, vision)  # no preprocessor file: CLIP defaults at 336
    tower = VisionTower(out, CLIP, vision, image_processor, source)
    save_model_dir(model, make_processor(tower, tokenizer, tiling), out)


def build_in_child(out: Path, shape: str, timeout: float) -> None:
    run = common.run_child(
        [common.python(), str(Path(__file__).resolve()), "--build", shape, "--out", str(out)],
        env=launch_env(),
        check=False,
        timeout=timeout,
    )
    if run["timed_out"] or run["returncode"] != 0:
        why = "stopped at the time budget" if run["timed_out"] else failure_reason(run["stderr"])
        raise LaunchFailed(f"building the {shape} model: {why}", run["stderr"][-4000:])


def write_data(out: Path, kind: str, n: int) -> Path:
    """``n`` records of a data kind: shapes at 336 px (stage1), the same stretched to WIDE (anyres),
    bench/batching.py's stage-2 length mix, or the video demo's clips as frame lists (video: PNGs, no decoder
    needed). Returns the records' path; images are in ``out/images`` (videos in ``out/videos``)."""
    from PIL import Image

    from llava_loop.demo.shapes import write_shapes

    if kind == "video":
        from llava_loop.demo.clips import write_clips

        return write_clips(out, n, seed=0, size=336, frames=VIDEO_FRAMES, frame_lists=1.0)
    if kind == "stage2":
        from batching import write_mix

        return write_mix(out, n)
    path = write_shapes(out, n, seed=0, size=336)
    if kind == "anyres":
        for i, image in enumerate(sorted((out / "images").iterdir())):
            Image.open(image).resize(WIDE[i % len(WIDE)]).save(image, quality=92)
    return path


def records_needed(row: Row) -> int:
    """Enough records for a launch of ``row`` (a token-budget run that outlasts them starts a second epoch)."""
    per_step = row.token_budget // 400 if row.token_budget else row.micro_batch  # stage 2: about 700 tokens a record
    return (STEPS + 1) * per_step


# ------------------------------------------------------------------------------------------------
# One launch
# ------------------------------------------------------------------------------------------------


class PeakMemory:
    """A hook for the launched run: every process's peak GPU memory in the steady state, allocated and reserved."""

    def on_step_end(self, trainer, metrics):
        import torch

        if metrics["step"] == WARMUP and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer):
        import torch

        cuda = torch.cuda.is_available()
        peaks = {
            "allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
        }
        rank = trainer.accelerator.process_index
        (Path(trainer.output_dir) / f"peak_memory_{rank}.json").write_text(json.dumps(peaks))


class LaunchFailed(Exception):
    """A launch or build that exited non-zero: a short reason and the tail of its stderr."""

    def __init__(self, reason: str, stderr_tail: str = ""):
        super().__init__(reason)
        self.reason, self.stderr_tail = reason, stderr_tail


WHY = re.compile(r"\b\w*(Error|Exception|SystemExit)\b:|^error:")
LAUNCHER = re.compile(r"ChildFailedError|torch[./]distributed[./]elastic")  # the launcher reporting a rank's exit


def failure_reason(stderr: str) -> str:
    """One line that says why a launch failed: out of memory where it was, else a rank's last error line (what the
    launcher prints once a rank has exited, its own traceback and summary, is not the reason)."""
    lines = stderr.splitlines()
    ours = next((i for i, line in enumerate(lines) if LAUNCHER.search(line)), len(lines))
    lines = [line.strip() for line in lines[:ours] if line.strip()] or [line.strip() for line in lines if line.strip()]
    memory = [line for line in lines if "out of memory" in line.lower() or "OutOfMemoryError" in line]
    if memory:
        return "out of memory: " + memory[-1][:300]
    errors = [line for line in lines if WHY.search(line)]
    return (errors or lines or ["no stderr"])[-1][:300]


def launch_env() -> dict:
    """The caller's PYTHONPATH kept (on the GPU machine it holds the carried wheels), bench/ and the root first, the
    hub offline."""
    caller = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    path = [str(common.ROOT / "bench"), str(common.ROOT), *filter(None, caller)]
    return {"PYTHONPATH": os.pathsep.join(path), "TOKENIZERS_PARALLELISM": "false", **OFFLINE}


def run_config(row: Row, model_dir: Path, data: Path, out: Path, args) -> dict:
    config = {
        "mode": row.mode,
        "output_dir": str(out),
        "resume": "none",
        "model": {"path": str(model_dir)},
        "hooks": ["gpu:PeakMemory"],
        "data": {
            "path": str(data),
            "image_dir": str(data.parent / ("videos" if row.data == "video" else "images")),
            "num_workers": args.workers,
            # LLaVA-NeXT trains at 4096; a 32-frame clip alone is 4,609 tokens
            "max_length": 8192 if row.data == "video" else 4096 if SHAPES[row.shape].arch != "llava" else 2048,
            "video_frames": VIDEO_FRAMES,
            "padding_free": bool(row.token_budget),
            "max_tokens_per_micro_batch": row.token_budget,
        },
        "train": {
            "micro_batch_size": row.micro_batch,
            "grad_accum": 1,
            "max_steps": args.steps,
            "lr": 1e-3 if row.mode == "projector" else 2e-5,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "gradient_checkpointing": False,
            "precision": "fp32" if args.smoke else "bf16",
            "liger": "on" if row.kernels == "liger" else "off",
            "compile": row.kernels == "compile",
        },
        "checkpoint": {"every": 0, "keep_last": 1},
        "eval": {"every": 0, "holdout": 0},
    }
    return config


def launch(row: Row, model_dir: Path, data: Path, out: Path, args, timeout: float) -> dict:
    """One real training launch; returns its measured figures (``partial`` when the time budget stopped it after
    its warm-up), or raises LaunchFailed."""
    out.mkdir(parents=True)
    config_path = out.parent / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(run_config(row, model_dir, data, out, args)))
    cmd = [
        common.python(),
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(common.ROOT / "accelerate_config.yaml"),
        "--num_processes",
        str(args.processes),
        "--main_process_port",
        str(args.port),
        "train.py",
        "--config",
        str(config_path),
    ]
    run = common.run_child(cmd, env=launch_env(), check=False, timeout=timeout)
    metrics = out / "metrics.jsonl"
    steps = [m for m in map(json.loads, metrics.read_text().splitlines())] if metrics.is_file() else []
    steady = [m for m in steps if m.get("kind") == "train" and m["step"] > WARMUP]
    if run["timed_out"] and not steady:
        raise LaunchFailed(f"stopped at the time budget after {timeout:.0f} s, before a steady step", run["stderr"])
    if run["returncode"] != 0 and not run["timed_out"]:
        raise LaunchFailed(f"exit {run['returncode']}: {failure_reason(run['stderr'])}", run["stderr"][-4000:])
    times = [m["step_time"] for m in steady]
    peaks = [json.loads(p.read_text()) for p in sorted(out.glob("peak_memory_*.json"))]
    median = common.median
    return {
        "status": "partial" if run["timed_out"] else "ok",
        "steps": len(steady),
        "seconds": median(times),
        "spread": max(times) / min(times),
        "samples_per_s": median([m["samples_per_s"] for m in steady]) * args.processes,
        "tokens_per_s": median([m["tokens_per_s"] for m in steady]) * args.processes,
        "tokens_per_sample": median([m["tokens_per_s"] / m["samples_per_s"] for m in steady]),
        "pad_fraction": median([m["pad_fraction"] for m in steady]),
        "flops": median([m["flops"] for m in steady]),
        "mfu": median([m["mfu"] for m in steady]) if all("mfu" in m for m in steady) else None,
        "loss": steady[-1]["loss"],
        "allocated_gib": max((p["allocated_gib"] for p in peaks), default=float("nan")),
        "reserved_gib": max((p["reserved_gib"] for p in peaks), default=float("nan")),
    }


# ------------------------------------------------------------------------------------------------
# The plan, run
# ------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    def cells(r):
        if r["status"] not in ("ok", "partial"):
            return ["—"] * 8
        mfu = "—" if r["mfu"] is None else f"{r['mfu']:.1%}"
        return [
            f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            mfu,
            f"{r['seconds']:.3f} ({r['spread']:.2f}x)",
            f"{r['allocated_gib']:.1f}",
            f"{r['reserved_gib']:.1f}",
            f"{r['loss']:.4f}",
            f"{r['wall_s'] / 60:.1f} ({r['predicted_s'] / 60:.1f})",
        ]

    headers = [
        "row",
        "shape",
        "mode",
        "micro-batch (tokens)",
        "kernels",
        "samples/s",
        "tokens/s",
        "MFU (needed FLOPs)",
        "step s (slowest/fastest)",
        "peak allocated GiB",
        "peak reserved GiB",
        "loss",
        "minutes (predicted)",
        "predicted GiB",
        "target",
        "status",
    ]
    lines = [
        [
            r["row"],
            r["shape"],
            r["mode"],
            r["token_budget"] or r["micro_batch"],
            r["kernels"],
            *cells(r),
            f"{r['predicted_gib']:.1f}",
            r["target"],
            r["status"] if r["status"] in ("ok",) else f"{r['status']}: {r.get('reason', '')}".rstrip(": "),
        ]
        for r in rows
    ]
    return common.table(headers, lines)


def main() -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="run these rows of PLAN, in PLAN's order")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with its predictions; run nothing")
    parser.add_argument("--smoke", action="store_true", help="CPU: each row's tiny twin through the same launch")
    parser.add_argument("--card", choices=list(CARDS), help="plan for this card (default: the one nvidia-smi finds)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=1, help="GPUs to launch on")
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument(
        "--budget-minutes",
        type=float,
        help="wall time for the whole bench: no row starts whose predicted time (scaled by the rows so far) does "
        "not fit what is left, and a running one is stopped when it runs out",
    )
    parser.add_argument("--out", type=Path, help="also write plan.md, rows.jsonl (each row as it ends) and table.md")
    parser.add_argument("--build", choices=list(SHAPES), help=argparse.SUPPRESS)  # the builder child
    args = parser.parse_args()
    if args.build:
        build_random_model(args.out, args.build)
        return 0
    rows = [row for row in PLAN if row.name in args.rows] if args.rows else list(PLAN)
    if args.dry_run:
        print(plan_table(rows))
        return 0
    # SIGTERM (a timeout around this script) ends it through the finally below, which writes what ran
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.flops import peak_tflops

    card = CARDS[args.card] if args.card else detect_card()
    if card is None and not args.smoke:
        raise SystemExit("no GPU here (nvidia-smi finds none); use --smoke to check the script on CPU, --dry-run")
    if args.smoke:
        args.steps, args.workers, args.processes = WARMUP + 1, 0, 1
    peak = peak_tflops(card[0]) if card else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.jsonl").write_text("")
        (args.out / "plan.md").write_text(plan_table(rows) + "\n")
    root = Path(tempfile.mkdtemp(prefix="llava-gpu-bench-"))
    deadline = started + 60 * args.budget_minutes if args.budget_minutes is not None else float("inf")
    results, built, data, scale = [], {}, {}, []  # scale: measured / predicted wall time of each row run

    def record(result: dict) -> None:
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out / "rows.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")

    try:
        for planned in rows:
            row = twin(planned) if args.smoke else planned
            result = {"row": planned.name, **asdict(row), "predicted_gib": memory_estimate(planned)["total"]}
            why = refusal(planned, card)
            if why:
                record({**result, "status": "refused", "reason": why})
                continue
            if row.kernels == "liger" and args.smoke:
                record({**result, "status": "skipped", "reason": "Liger's Triton kernels need a CUDA GPU"})
                continue
            predicted = predicted_seconds(planned, peak or 989.0, built=row.shape in built)
            expected = predicted * (common.median(scale) if scale else 1.0)
            left = deadline - time.monotonic()
            result["predicted_s"] = predicted
            if expected > left:
                reason = f"time budget: {max(left, 0):.0f} s left, the row is predicted at {expected:.0f} s"
                record({**result, "status": "skipped", "reason": reason})
                continue
            t0 = time.monotonic()
            try:
                model_dir = root / f"model-{row.shape}"
                if isinstance(built.get(row.shape), LaunchFailed):
                    raise built[row.shape]
                if row.shape not in built:
                    try:
                        build_in_child(model_dir, row.shape, timeout=deadline - time.monotonic())
                        built[row.shape] = True
                    except LaunchFailed as exc:
                        built[row.shape] = exc
                        raise
                if row.data not in data:
                    data[row.data] = write_data(root / f"data-{row.data}", row.data, records_needed(row))
                out = root / f"run-{planned.name}"
                measured = launch(row, model_dir, data[row.data], out, args, timeout=deadline - time.monotonic())
                if measured["status"] == "partial":
                    measured["reason"] = f"stopped at the time budget after {measured['steps']} steady steps"
                record({**result, **measured, "wall_s": time.monotonic() - t0})
            except LaunchFailed as exc:
                record(
                    {
                        **result,
                        "status": "failed",
                        "reason": exc.reason,
                        "wall_s": time.monotonic() - t0,
                        "stderr_tail": exc.stderr_tail,
                    }
                )
            except Exception as exc:  # noqa: BLE001 - a measuring bug in one row must not lose the others
                record(
                    {
                        **result,
                        "status": "failed",
                        "reason": f"{type(exc).__name__}: {exc}"[:300],
                        "wall_s": time.monotonic() - t0,
                    }
                )
            scale.append((time.monotonic() - t0) / predicted)
    finally:
        name = "CPU" if args.smoke else card[0]
        if args.smoke and card:
            name += f" (planned as for a {card[0]})"
        report = "\n".join(
            [
                f"### GPU: CLIP-L/14-336 + Qwen2.5-shaped LLMs, accelerate launch + DeepSpeed ZeRO-2, "
                f"{'fp32 (smoke)' if args.smoke else 'bf16'} on {args.processes} x {name}",
                "",
                f"`python bench/gpu.py {' '.join(sys.argv[1:])}` — {common.machine()}, {time.strftime('%Y-%m-%d')}",
                "",
                table(results),
                "",
                f"{time.monotonic() - started:.0f} s in all",
            ]
        )
        print(report, flush=True)
        if args.out:
            (args.out / "table.md").write_text(report + "\n")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
