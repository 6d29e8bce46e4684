"""Benchmark 14: DPO removes a hallucination that SFT taught (llava_loop/demo/hallucination.py).

1. SFT, the demo's recipe (tiny towers, full mode, configs/demo.yaml), on captions that name a second, absent
   object for most images whose shape sits in a top position: ``--sft-steps`` steps, then exported.
2. From that export, the same budget (``--steps`` optimizer steps of 16 records) three ways: SFT continued on the
   same data; DPO (``llava_loop.preference:dpo``, beta 0.1, the export as the reference) on pairs that prefer the
   faithful caption over the same caption with a second object; and DPO + SFT on the chosen answers
   (``dpo_sft``, sft_weight 1: LLaVA-NeXT's dpo_alpha 1), on the same pairs at the same learning rate.
3. Each scored on 400 held-out images with faithful captions, at greedy decoding: how often a caption names a
   second object, whether its first object is right, and exact match.

    python bench/dpo_demo.py                       # about 8 minutes on the 2-core CPU machine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = common.ROOT / "runs" / "bench-dpo"


def train_run(name: str, model: Path, data: Path, steps: int, extra: list[str]) -> tuple[Path, float]:
    """A run of the demo's recipe on ``data`` from ``model``; its export and its training seconds."""
    return common.demo_run(RUNS / name, model, data, data.parent / "images", steps, extra)


def score(model: Path, val: Path) -> dict:
    from llava_loop.data.records import load_records
    from llava_loop.demo.hallucination import hallucination_scores
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import load_for_inference

    loaded, _, encoder = load_for_inference(model)
    metrics, _, _ = evaluate_model(
        loaded, encoder, load_records(val), val.parent / "images", scorers=[hallucination_scores]
    )
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.demo.hallucination import write_sets
    from llava_loop.demo.tiny import build_tiny

    RUNS.mkdir(parents=True, exist_ok=True)
    model = RUNS / "tiny-model"
    if not (model / "config.json").is_file():
        build_tiny(model)
    paths = write_sets(RUNS / "data", sft=16_000, pairs=8_000, val=400)
    sft, sft_seconds = train_run("sft", model, paths["sft"], args.sft_steps, [])
    more, more_seconds = train_run("sft-more", sft, paths["sft"], args.steps, [])
    lr = f"train.lr={args.dpo_lr}"
    dpo, dpo_seconds = train_run(
        "dpo", sft, paths["pairs"], args.steps, ["loss={fn: llava_loop.preference:dpo, kwargs: {beta: 0.1}}", lr]
    )
    rpo = "loss={fn: llava_loop.preference:dpo_sft, kwargs: {beta: 0.1, sft_weight: 1.0}}"
    dpo_sft, dpo_sft_seconds = train_run("dpo-sft", sft, paths["pairs"], args.steps, [rpo, lr])
    rows = []
    for name, path, seconds in (
        (f"SFT, {args.sft_steps} steps", sft, sft_seconds),
        (f"+ SFT, {args.steps} more steps", more, more_seconds),
        (f"+ DPO, {args.steps} steps", dpo, dpo_seconds),
        (f"+ DPO + SFT, {args.steps} steps", dpo_sft, dpo_sft_seconds),
    ):
        m = score(path, paths["val"])
        rows.append(
            [
                name,
                f"{m['hallucination_rate']:.1%}",
                f"{m['first_object_accuracy']:.1%}",
                f"{m['exact_match']:.1%}",
                f"{seconds:.0f}",
            ]
        )
    print(common.header("DPO against a taught hallucination (tiny demo towers)", "python bench/dpo_demo.py"))
    print(
        common.table(
            ["model", "held-out captions naming a second object", "first object right", "exact match", "train s"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
