"""The chunked loss: peak memory and time of the default loss's LM head + cross-entropy in chunks of supervised
rows (recomputed in backward) against one chunk (the whole (rows x vocabulary) logits at once, the loss before
chunking), on a stage-2-like micro-batch with ~2,500 supervised tokens at Qwen2.5's 151,936-row vocabulary.

Each variant runs in its own process on the bench_small model: forward + backward of the loss, median time, the
process's peak RSS and its growth during the steps. The losses must agree to 1e-6.

    python bench/chunked_loss.py --supervised 2500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = {"one chunk (before)": 10**9, "chunks of 1024": 1024, "chunks of 512 (default)": 512, "chunks of 256": 256}


def batch_with_answers(vocab: int, rows: int, length: int, supervised: int) -> dict:
    """Text-only rows whose last ``supervised / rows`` tokens are the answer (the collator's layout and index)."""
    import torch

    from llava_loop.data.collate import supervised_index

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = torch.full_like(ids, -100)
    answer = supervised // rows + 1
    labels[:, -answer:] = ids[:, -answer:]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "supervised": supervised_index(labels),
    }


def variant(config: str, chunk_rows: int, args) -> None:
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.config import load_config
    from llava_loop.losses import label_only_ce
    from llava_loop.runtime import load_model

    model, _ = load_model(load_config(common.ROOT / config).model.path)
    model.train()
    batch = batch_with_answers(model.config.text_config.vocab_size, args.rows, args.length, args.supervised)
    steps = common.loss_steps(model, lambda: label_only_ce(model, batch, chunk_rows=chunk_rows)["loss"], args.repeats)
    print(
        json.dumps(
            {
                **steps,
                "growth_mib": steps["peak_rss_mib"] - steps["before_mib"],
                "supervised": batch["supervised"].shape[1],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--supervised", type=int, default=2500, help="supervised tokens in the micro-batch")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=700)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_rows:
        return variant(args.config, args.chunk_rows, args)
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.config import load_config
    from llava_loop.loop import run_setup

    run_setup(load_config(common.ROOT / args.config))
    results = {}
    for name, chunk_rows in VARIANTS.items():
        run = common.run_child(
            [
                common.python(),
                __file__,
                "--config",
                args.config,
                "--chunk-rows",
                str(chunk_rows),
                "--supervised",
                str(args.supervised),
                "--rows",
                str(args.rows),
                "--length",
                str(args.length),
                "--repeats",
                str(args.repeats),
            ]
        )
        results[name] = common.last_json_line(run["stdout"])
    before = results["one chunk (before)"]
    for r in results.values():
        assert abs(r["loss"] - before["loss"]) <= 1e-6 * abs(before["loss"]), (r["loss"], before["loss"])
    print(common.header("Chunked loss vs one chunk", "python bench/chunked_loss.py " + " ".join(sys.argv[1:])))
    print(
        f"{args.rows} rows x {args.length} tokens, {before['supervised']} supervised, vocabulary 151,936; loss "
        f"forward + backward, median of {args.repeats}\n"
    )
    rows = [
        [
            name,
            f"{r['seconds'] * 1e3:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['growth_mib']:.0f}",
            f"{r['growth_mib'] / before['growth_mib']:.2f}x",
            f"{r['loss']:.4f}",
        ]
        for name, r in results.items()
    ]
    print(
        common.table(
            ["loss", "fwd+bwd (ms)", "peak RSS (MiB)", "growth (MiB)", "growth vs before", "summed loss"], rows
        )
    )


if __name__ == "__main__":
    main()
