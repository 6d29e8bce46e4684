"""Benchmark 12, AnyRes pays where detail matters: the base-resolution model and its LLaVA-NeXT upgrade, trained
with the same budget on the "fine print" task (llava_loop/demo/fine_print.py: a small patch of 2-pixel pattern in
a 3:1 image), scored on held-out images.

Both start from the same tiny model (the demo's towers); the LLaVA-NeXT one is ``build --from`` it (towers and
projector kept, a seeded image_newline). The base model uses LLaVA-1.5's ``pad`` (the whole image, padded square);
both train ``full`` for the same steps, micro-batch and seed through the real loop, one after the other in this
process. Reports held-out exact match, tokens per sample and training samples/s side by side.

    python bench/anyres.py                   # the BENCHMARKS row: 400 steps x 16 samples each
    python bench/anyres.py --steps 20 --train 400 --val 40   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def config(root: Path, arch: str, steps: int) -> dict:
    return {
        "mode": "full",
        "output_dir": str(root / f"run-{arch}"),
        "resume": "overwrite",
        "model": {"path": str(root / arch)},
        "data": {
            "path": str(root / "train/chat.json"),
            "image_dir": str(root / "train/images"),
            "eval_path": str(root / "val/chat.json"),
            "eval_image_dir": str(root / "val/images"),
            # the base model sees the whole image, padded square; a tiled model keeps the image's aspect ratio
            "image_aspect_ratio": "pad" if arch == "llava" else "resize",
            "num_workers": 1,
            "max_length": 512,
        },
        "train": {"micro_batch_size": 16, "max_steps": steps, "lr": 1e-3, "warmup_ratio": 0.05, "seed": 42},
        "checkpoint": {"every": 0, "keep_last": 1},
        "eval": {"every": 0, "max_samples": 0},
    }


def train_and_score(root: Path, arch: str, steps: int) -> dict:
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.config import load_config
    from llava_loop.demo.pipeline import score_model
    from llava_loop.loop import train

    path = root / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(config(root, arch, steps)))
    cfg = load_config(str(path), [])
    started = time.perf_counter()
    state = train(cfg)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r.get("kind") == "train" and r["step"] > 5]  # past start-up
    after, _, _ = score_model(complete_checkpoints(Path(cfg.output_dir))[-1], cfg)
    return {
        "exact_match": after["exact_match"],
        "eval_loss": after["eval_loss"],
        "held_out": after["n"],
        "tokens_per_sample": common.median(
            r["tokens_per_s"] / r["samples_per_s"] * (1 - r["pad_fraction"]) for r in steps_rows
        ),
        "samples_per_s": common.median(r["samples_per_s"] for r in steps_rows),
        "train_seconds": seconds,
        "samples": state.samples_seen,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train", type=int, default=6400, help="training records")
    parser.add_argument("--val", type=int, default=400, help="held-out records")
    parser.add_argument("--out", default="", help="keep the models and runs here (default: a temporary folder)")
    args = parser.parse_args()

    from llava_loop.build import upgrade_llava
    from llava_loop.demo.fine_print import write_patterns
    from llava_loop.demo.tiny import build_tiny

    with tempfile.TemporaryDirectory(prefix="llava-anyres-bench-") as tmp:
        root = Path(args.out or tmp)
        build_tiny(root / "llava", "tiny")
        upgrade_llava(root / "llava", root / "llava-next")
        write_patterns(root / "train", args.train, seed=1)
        write_patterns(root / "val", args.val, seed=2, prefix="val")
        results = {arch: train_and_score(root, arch, args.steps) for arch in ("llava", "llava-next")}

    command = "python bench/anyres.py" + "".join(f" {a}" for a in sys.argv[1:])
    print(common.header("AnyRes on fine print: base resolution vs LLaVA-NeXT, same budget", command))
    print(
        common.table(
            ["model", "held-out exact match", "eval loss", "tokens/sample", "samples/s", "train s"],
            [
                [
                    arch,
                    f"{r['exact_match']:.1%} of {r['held_out']}",
                    f"{r['eval_loss']:.3f}",
                    f"{r['tokens_per_sample']:.0f}",
                    f"{r['samples_per_s']:.1f}",
                    f"{r['train_seconds']:.0f}",
                ]
                for arch, r in results.items()
            ],
        )
    )
    base, tiled = results["llava"], results["llava-next"]
    print(
        f"\nLLaVA-NeXT / base: {tiled['tokens_per_sample'] / base['tokens_per_sample']:.2f}x tokens per sample, "
        f"{tiled['samples_per_s'] / base['samples_per_s']:.2f}x samples/s ({args.steps} steps x 16 samples each)"
    )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
