"""Benchmark 15: what only video can teach (llava_loop/demo/motion.py).

1. The demo's tiny towers upgraded to OneVision (``llava-loop build --from ... --arch llava-onevision``), trained
   from scratch in ``full`` mode on synthetic clips of a shape moving left, right, up or down, once with 1 frame a
   video and once with ``--frames`` frames, on the same budget (``--steps`` optimizer steps of 16 clips, same seed
   and learning rate). One sampled frame is the clip's middle, where the shape's place says nothing of its direction.
2. Each scored on held-out clips by ``llava-loop eval``'s path (``evaluate_model``, greedy): exact match and the share
   of answers naming the right direction (chance: 25%), with the training runs' samples/s beside them.

Needs the video extra and torchvision (OneVision's processor): run it in the extras venv.

    python bench/video_demo.py            # about 10 minutes on the 2-core CPU machine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = common.ROOT / "runs" / "bench-video"


def train_run(name: str, model: Path, data: Path, frames: int, steps: int) -> tuple[Path, float, float]:
    """A run of the demo's recipe on the clips; its export, training seconds and median samples/s."""
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.config import load_config
    from llava_loop.export import export
    from llava_loop.loop import train

    out = RUNS / name
    overrides = [
        f"output_dir={out}",
        "resume=overwrite",
        f"model.path={model}",
        "setup=[]",
        f"data.path={data}",
        f"data.image_dir={data.parent / 'videos'}",
        "data.eval_path=",
        "data.eval_image_dir=",
        f"data.video_frames={frames}",
        "data.max_length=512",
        f"train.max_steps={steps}",
        "train.time_limit_minutes=0",
        "eval.every=0",
    ]
    started = time.monotonic()
    train(load_config("configs/demo.yaml", overrides))
    seconds = time.monotonic() - started
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = common.median(
        [r["samples_per_s"] for r in rows if r.get("kind", "train") == "train" and "samples_per_s" in r][5:]
    )
    return export(complete_checkpoints(out)[-1], RUNS / f"{name}-export"), seconds, rate


def score(model: Path, val: Path) -> dict:
    from llava_loop.data.records import load_records
    from llava_loop.demo.motion import direction_accuracy
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import load_for_inference

    def directions(predictions):
        return direction_accuracy([p["prediction"] for p in predictions], [p["reference"] for p in predictions])

    loaded, _, encoder = load_for_inference(model, device="cpu")
    metrics, _, _ = evaluate_model(loaded, encoder, load_records(val), val.parent / "videos", scorers=[directions])
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--train", type=int, default=6400)
    parser.add_argument("--val", type=int, default=400)
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.build import upgrade_llava
    from llava_loop.demo.motion import write_motion
    from llava_loop.demo.tiny import build_tiny

    RUNS.mkdir(parents=True, exist_ok=True)
    tiny, model = RUNS / "tiny-model", RUNS / "tiny-onevision"
    if not (model / "config.json").is_file():
        build_tiny(tiny)
        upgrade_llava(tiny, model, arch="llava-onevision")
    train = RUNS / "data" / "train" / "motion.json"
    val = RUNS / "data" / "val" / "motion.json"
    if not train.is_file():
        write_motion(train.parent, args.train, seed=0)
        write_motion(val.parent, args.val, seed=1)
    rows = []
    for frames in (1, args.frames):
        export, seconds, rate = train_run(f"frames-{frames}", model, train, frames, args.steps)
        m = score(export, val)
        rows.append(
            [
                f"{frames} frame{'s' * (frames > 1)}",
                f"{m['direction_accuracy']:.1%}",
                f"{m['exact_match']:.1%}",
                f"{rate:.1f}",
                f"{seconds:.0f}",
            ]
        )
    print(
        common.header("Motion direction from 1 frame vs N frames (tiny OneVision towers)", "python bench/video_demo.py")
    )
    print(common.table(["frames per video", "held-out direction right", "exact match", "samples/s", "train s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
