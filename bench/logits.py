"""Benchmark 2: label-only logits vs full-vocabulary logits, forward + backward, at Qwen2.5's vocabulary.

Each variant runs in its own process on the bench_small model (151,936-token vocabulary, 576 image tokens
plus a caption of ~10 tokens and the chat scaffolding): median step time and the process's peak RSS.
The two losses must be identical.

    python bench/logits.py --config configs/bench_small.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def variant(config: str, name: str, micro: int, repeats: int) -> None:
    sys.path.insert(0, str(common.ROOT))

    from llava_loop.config import load_config
    from llava_loop.data.collate import Collator
    from llava_loop.loaders import make_datasets
    from llava_loop.losses import full_logits_ce, label_only_ce
    from llava_loop.runtime import load_model

    cfg = load_config(common.ROOT / config)
    model, processor = load_model(cfg.model.path)
    model.train()
    dataset, _ = make_datasets(cfg, processor)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(micro)])
    loss_fn = {"label_only": label_only_ce, "full": full_logits_ce}[name]
    steps = common.loss_steps(model, lambda: loss_fn(model, batch)["loss"], repeats)
    print(
        json.dumps(
            {
                **steps,
                "seq_len": batch["input_ids"].shape[1],
                "supervised": int((batch["labels"][:, 1:] != -100).sum()),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", choices=["label_only", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return variant(args.config, args.variant, args.micro_batch, args.repeats)
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.config import load_config
    from llava_loop.loop import run_setup

    run_setup(load_config(common.ROOT / args.config))
    results = {}
    for name in ("label_only", "full"):
        run = common.run_child(
            [
                common.python(),
                __file__,
                "--config",
                args.config,
                "--variant",
                name,
                "--micro-batch",
                str(args.micro_batch),
                "--repeats",
                str(args.repeats),
            ]
        )
        results[name] = common.last_json_line(run["stdout"])
    lo, full = results["label_only"], results["full"]
    assert abs(lo["loss"] - full["loss"]) <= 1e-5 * abs(full["loss"]), (lo["loss"], full["loss"])
    print(common.header("Label-only vs full logits", "python bench/logits.py " + " ".join(sys.argv[1:])))
    print(
        f"micro-batch {args.micro_batch}, sequence {lo['seq_len']} tokens, {lo['supervised']} supervised positions, "
        f"vocabulary 151,936; forward + backward, median of {args.repeats}\n"
    )
    rows = [
        [
            name,
            f"{r['seconds'] * 1e3:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['peak_rss_mib'] - r['before_mib']:.0f}",
            f"{r['loss']:.6f}",
        ]
        for name, r in results.items()
    ]
    print(
        common.table(["logits", "fwd+bwd (ms)", "peak RSS (MiB)", "growth during fwd+bwd (MiB)", "summed loss"], rows)
    )
    print(
        f"\nlabel-only is {full['seconds'] / lo['seconds']:.1f}x faster; losses equal to "
        f"{abs(lo['loss'] - full['loss']) / abs(full['loss']):.1e} relative"
    )


if __name__ == "__main__":
    main()
