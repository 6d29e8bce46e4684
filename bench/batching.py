"""Benchmark: ways of batching stage-2 data, through the real loop, on a LLaVA-665K-like length mix.

The mix is synthetic, at real geometry (336 px images = 576 tokens each, Qwen2.5's 151,936-token vocabulary; the
``bench_stage2`` towers, whose LLM is wide enough that its linear layers outweigh attention, as in real LLMs):
40% text-only chats, 10% two-image records, the rest single-image, with text lengths spread
so records run from about 100 to about 2,000 tokens. Five ways of batching run the same number of steps:

* padded: fixed micro-batches (``--micro`` x ``--accum`` samples per step), padded to their longest sample;
* length-grouped: the same samples per step, sorted by length within each step before cutting micro-batches;
* padding-free, dense mask: the padded run's micro-batches, packed into one row each, under plain sdpa
  (transformers' block-diagonal mask over the whole row);
* padding-free: the same packed rows under sdpa_varlen (sdpa per sample; the default for packed rows); its losses
  must equal the padded run's;
* padding-free + token budget: packed micro-batches filled up to ``--budget`` tokens, ``--budget-accum`` of them
  per step, which is about as many tokens per optimizer step as the fixed runs take.

Reported: padding fraction, median tokens/s and samples/s over the steps after the first two, and for the packed
run the largest loss difference from the padded run. The GPU projection assumes a compute-bound step whose cost
is proportional to the slots it processes (linear layers) plus the squared lengths of its rows or, with varlen
flash-attention, of its samples (attention).

    python bench/batching.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WARMUP = 2
CONFIG = "configs/bench_small.yaml"  # its settings; the model is the bench_stage2 preset
MODEL = common.ROOT / "runs" / "bench-stage2-model"
FILLER = (
    "a red circle in the top left .",
    "the blue square is in the center .",
    "which shape is it ?",
    "a small green cross near the bottom right .",
    "the picture shows one yellow triangle .",
)


def text_of(rng: random.Random, words: int) -> str:
    out = []
    while len(out) < words:
        out += rng.choice(FILLER).split()
    return " ".join(out[:words])


def write_mix(root: Path, n: int, seed: int = 0) -> Path:
    """Records in the LLaVA layout, on shapes images at 336 px; lengths drawn log-uniformly per kind."""
    from llava_loop.demo.shapes import write_shapes

    path = write_shapes(root, n, seed=seed, size=336, pair_ratio=0.1, prefix="mix")
    records = json.loads(path.read_text())
    rng = random.Random(seed)
    for record in records:
        if isinstance(record["image"], str) and rng.random() < 0.4 / 0.9:  # 40% text-only chats, ~100-2,000 tokens
            del record["image"]
            turns = record["conversations"]
            turns[0]["value"] = turns[0]["value"].replace("<image>", "").strip() + " " + text_of(rng, 20)
            turns[1]["value"] = text_of(rng, int(80 * (20 ** rng.random())))
        else:  # image records: 576 tokens per image plus ~20-600 tokens of text
            record["conversations"][-1]["value"] += " " + text_of(rng, int(15 * (30 ** rng.random())))
    path.write_text(json.dumps(records))
    return path


def run(name: str, data: Path, steps: int, micro: int, accum: int, *overrides: str) -> dict:
    out = common.ROOT / "runs" / f"bench-batching-{name}"
    common.run_child(
        [
            common.python(),
            "train.py",
            "--config",
            CONFIG,
            f"output_dir={out}",
            f"data.path={data}",
            f"model.path={MODEL}",
            "setup=[]",
            f"data.image_dir={data.parent / 'images'}",
            "data.max_length=2048",
            "data.num_workers=1",
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            f"train.max_steps={steps}",
            "mode=freeze_vision",
            "train.lr=1e-5",
            "resume=overwrite",
            "train.log_sample_ids=true",
            *overrides,
        ]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [r for r in rows if r["kind"] == "train"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--micro", type=int, default=4, help="samples per fixed micro-batch")
    parser.add_argument("--accum", type=int, default=2, help="fixed micro-batches per step")
    parser.add_argument("--budget", type=int, default=2048, help="tokens per packed micro-batch")
    parser.add_argument("--budget-accum", type=int, default=4, help="token-budget micro-batches per step")
    parser.add_argument(
        "--skip",
        default="",
        help="runs to leave out, by folder: padded is the baseline, so never it "
        "(grouped, packed-dense, packed, budget)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.demo.tiny import build_tiny

    if not (MODEL / "config.json").is_file():
        build_tiny(MODEL, "bench_stage2")
    data = write_mix(common.ROOT / "runs" / "bench-batching-data", args.records)
    fixed = (args.steps, args.micro, args.accum)
    ways = {  # name: (run folder, steps, micro, accum, overrides)
        "padded": ("padded", *fixed, ()),
        "length-grouped": ("grouped", *fixed, ("data.group_by_length=true",)),
        "padding-free, dense mask": (
            "packed-dense",
            *fixed,
            ("data.padding_free=true", "model.attn_implementation=sdpa"),
        ),
        "padding-free": ("packed", *fixed, ("data.padding_free=true",)),
        "padding-free + token budget": (
            "budget",
            args.steps,
            args.micro,
            args.budget_accum,
            ("data.padding_free=true", f"data.max_tokens_per_micro_batch={args.budget}"),
        ),
    }
    skip = set(args.skip.split(",")) - {""}
    runs = {
        name: run(folder, data, steps, micro, accum, *overrides)
        for name, (folder, steps, micro, accum, overrides) in ways.items()
        if folder not in skip
    }
    rows, base = [], None
    for name, result in runs.items():
        steps = result["steps"][WARMUP:]
        tokens = common.median([s["tokens_per_s"] for s in steps])
        samples = common.median([s["samples_per_s"] for s in steps])
        pad = sum(s["pad_fraction"] for s in result["steps"]) / len(result["steps"])
        base = base or tokens
        rows.append(
            [
                name,
                f"{pad:.1%}",
                f"{tokens:,.0f}",
                f"{samples:.2f}",
                f"{tokens / base:.2f}x",
                f"{common.median([s['samples'] for s in result['steps']]):.0f}",
                f"{common.median([s['tokens_per_s'] * s['step_time'] for s in result['steps']]):,.0f}",
            ]
        )
    same = [abs(a["loss"] - b["loss"]) for a, b in zip(runs["padded"]["steps"], runs["padding-free"]["steps"])]
    same_ids = all(
        a["sample_ids"] == b["sample_ids"] for a, b in zip(runs["padded"]["steps"], runs["padding-free"]["steps"])
    )
    pad = sum(s["pad_fraction"] for s in runs["padded"]["steps"]) / len(runs["padded"]["steps"])
    print(
        common.header(
            "Batching stage-2 data",
            f"python bench/batching.py --steps {args.steps} --records "
            f"{args.records} --micro {args.micro} --accum {args.accum} "
            f"--budget {args.budget} --budget-accum {args.budget_accum}"
            + (f" --skip {args.skip}" if args.skip else ""),
        )
    )
    print(
        common.table(
            ["batching", "padding", "tokens/s", "samples/s", "tokens/s vs padded", "samples/step", "tokens/step"], rows
        )
    )
    print(
        f"\npadded vs padding-free on the same micro-batches (same samples: {same_ids}): largest step-loss "
        f"difference {max(same):.2e}"
    )
    print(
        f"GPU projection: the padded run spends {pad:.1%} of its linear-layer FLOPs on padding; without it the "
        f"same tokens take {1 - pad:.2f} of the compute, {1 / (1 - pad):.2f}x the tokens/s where compute-bound"
    )


if __name__ == "__main__":
    main()
