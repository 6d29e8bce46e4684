"""Benchmark 15: what only video can teach (llava_loop/demo/clips.py).

1. The demo's tiny towers upgraded to OneVision (``llava-loop build --from ... --arch llava-onevision``), trained
   from scratch in ``full`` mode on synthetic clips where a shape of one colour is there from the start and one of
   another colour appears before the middle; the question is which colour came first. Once with 1 frame a video and
   once with ``--frames`` frames, on the same budget (``--steps`` optimizer steps of 16 clips, same seed and learning
   rate). One sampled frame is the clip's middle, which shows both shapes and nothing of their order.
2. Each scored on held-out clips by ``llava-loop eval``'s path (``evaluate_model``, greedy): exact match and the share
   of answers naming the colour that came first (chance, between the two colours a frame shows: 50%), with the
   training runs' samples/s beside them.

Needs the video extra and torchvision (OneVision's processor): run it in the extras venv.

    python bench/video_demo.py            # about 10 minutes on the 2-core CPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = common.ROOT / "runs" / "bench-video"


def train_run(name: str, model: Path, data: Path, frames: int, steps: int) -> tuple[Path, float, float]:
    """A run of the demo's recipe on the clips at ``frames`` frames a video; its export, training seconds and median
    samples/s over the steps after the first 5."""
    extra = [f"data.video_frames={frames}", "data.max_length=512"]
    export, seconds = common.demo_run(RUNS / name, model, data, data.parent / "videos", steps, extra)
    rows = [json.loads(line) for line in (RUNS / name / "metrics.jsonl").read_text().splitlines()]
    return export, seconds, common.median([r["samples_per_s"] for r in rows if "samples_per_s" in r][5:])


def score(model: Path, val: Path) -> dict:
    from llava_loop.data.records import load_records
    from llava_loop.demo.clips import order_accuracy
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import load_for_inference

    loaded, _, encoder = load_for_inference(model, device="cpu")
    metrics, _, _ = evaluate_model(loaded, encoder, load_records(val), val.parent / "videos", scorers=[order_accuracy])
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
    from llava_loop.demo.clips import write_clips
    from llava_loop.demo.tiny import build_tiny

    RUNS.mkdir(parents=True, exist_ok=True)
    tiny, model = RUNS / "tiny-model", RUNS / "tiny-onevision"
    if not (model / "config.json").is_file():
        build_tiny(tiny)
        upgrade_llava(tiny, model, arch="llava-onevision")
    train = RUNS / "data" / "train" / "clips.json"
    val = RUNS / "data" / "val" / "clips.json"
    if not train.is_file():
        write_clips(train.parent, args.train, seed=0)
        write_clips(val.parent, args.val, seed=1)
    rows = []
    for frames in (1, args.frames):
        export, seconds, rate = train_run(f"frames-{frames}", model, train, frames, args.steps)
        m = score(export, val)
        rows.append(
            [
                f"{frames} frame{'s' * (frames > 1)}",
                f"{m['order_accuracy']:.1%}",
                f"{m['exact_match']:.1%}",
                f"{rate:.1f}",
                f"{seconds:.0f}",
            ]
        )
    print(
        common.header(
            "Which colour came first, from 1 frame vs N frames (tiny OneVision towers)", "python bench/video_demo.py"
        )
    )
    print(
        common.table(["frames per video", "held-out: first colour right", "exact match", "samples/s", "train s"], rows)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
