"""The floor: a bare PyTorch loop over batches collated ahead of time and held in memory. Forward, backward
and AdamW only, with llava_loop's default loss (LM head only where labels are set) normalised the same way.
It measures what the model costs, so the loop's overhead is the difference.

    python bench/floor.py --config configs/bench_small.yaml --steps 12
Prints one JSON line: per-step wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from llava_loop.config import load_config
    from llava_loop.data.collate import Collator
    from llava_loop.loaders import make_datasets
    from llava_loop.loop import run_setup
    from llava_loop.losses import label_only_ce
    from llava_loop.modes import apply_mode
    from llava_loop.runtime import load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    cfg = load_config(args.config)
    run_setup(cfg)
    torch.manual_seed(cfg.train.seed)
    model, processor = load_model(cfg.model.path)
    model = apply_mode(model, cfg.canonical_mode, cfg.lora).train()
    dataset, _ = make_datasets(cfg, processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    windows = [
        [collate([dataset[(s * ga + m) * mb + i] for i in range(mb)]) for m in range(ga)] for s in range(args.steps)
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    times = [time.monotonic()]
    for window in windows:
        tokens = sum(b["n_label_tokens"] for b in window)
        for batch in window:
            (label_only_ce(model, batch)["loss"] / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.monotonic())
    print(json.dumps({"step_seconds": [b - a for a, b in zip(times, times[1:])], "samples_per_step": mb * ga}))


if __name__ == "__main__":
    main()
