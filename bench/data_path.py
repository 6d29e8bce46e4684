"""Benchmark 3: the data path (decode, processor, encode, collate) and the length-grouped sampler.

* samples/s through the real DataLoader with 0, 1 and 2 workers at the config's image size (336 px for
  bench_small), consuming batches as fast as they come (no model);
* the padding fraction of micro-batches with and without ``data.group_by_length`` on a mixed-length
  multi-turn conversation set, from real token lengths.

    python bench/data_path.py --config configs/bench_small.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def loader_throughput(cfg, processor, workers: int, batches: int, fast: bool) -> float:
    from llava_loop.loaders import make_datasets, make_train_loader

    cfg.data.num_workers = workers
    dataset, _ = make_datasets(cfg, processor)
    dataset.encoder.fast_pixels = fast and dataset.encoder.fast_pixels  # False: Hugging Face's image processor
    loader, sampler = make_train_loader(dataset, cfg, world_size=1, pad_token_id=processor.tokenizer.pad_token_id)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(iterator)["ids"])
    return n / (time.perf_counter() - start)


def padding_fraction(lengths, order, micro: int) -> float:
    batches = [lengths[order[i : i + micro]] for i in range(0, len(order) - micro + 1, micro)]
    return 1 - sum(int(b.sum()) for b in batches) / sum(int(b.max()) * len(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from transformers import AutoProcessor

    from llava_loop.config import load_config
    from llava_loop.data.encode import SampleEncoder
    from llava_loop.data.lengths import count_lengths
    from llava_loop.data.records import load_records
    from llava_loop.data.sampler import EpochSampler
    from llava_loop.demo.shapes import write_shapes
    from llava_loop.loop import run_setup

    cfg = load_config(common.ROOT / args.config)
    run_setup(cfg)
    processor = AutoProcessor.from_pretrained(cfg.model.path)
    size = processor.image_processor.crop_size["height"]
    rows = []
    for workers in args.workers:  # side by side: HF's image processor vs llava_loop's float32 CLIP path
        hf = loader_throughput(cfg, processor, workers, args.batches, fast=False)
        fast = loader_throughput(cfg, processor, workers, args.batches, fast=True)
        rows.append([workers, f"{hf:.1f}", f"{fast:.1f}", f"{fast / hf:.2f}x"])
    print(common.header("Data path", "python bench/data_path.py " + " ".join(sys.argv[1:])))
    print(f"{size} px JPEGs, micro-batch {cfg.train.micro_batch_size}, {args.batches} batches after the first\n")
    print(common.table(["workers", "samples/s, HF image processor", "samples/s, llava_loop pixels", "speed-up"], rows))

    mixed = write_shapes(common.ROOT / "runs" / "bench-mixed", 1024, seed=3, size=32, max_turns=6, prefix="mixed")
    records = load_records(mixed)
    encoder = SampleEncoder(processor, max_length=4096)
    lengths = count_lengths(records, encoder)
    micro, group = 8, 8 * 4  # micro-batch 8, accumulation 4, one process
    plain = EpochSampler(len(records), seed=0).order(0)
    grouped = EpochSampler(len(records), seed=0, lengths=lengths, group_size=group).order(0)
    print(
        f"\nPadding on {len(records)} mixed-length conversations (1-6 turns; {lengths.min()}-{lengths.max()} tokens), "
        f"micro-batch {micro}, global batch {group}:\n"
    )
    print(
        common.table(
            ["sampler", "padding fraction"],
            [
                ["shuffled", f"{padding_fraction(lengths, plain, micro):.3f}"],
                ["group_by_length", f"{padding_fraction(lengths, grouped, micro):.3f}"],
            ],
        )
    )
    print(json.dumps({"workers": {r[0]: {"hf": float(r[1]), "fast": float(r[2])} for r in rows}}))


if __name__ == "__main__":
    main()
