"""Benchmark: data at scale, for each source (JSON blob, Arrow, webdataset shards) at 595K and 5M records.

Writes synthetic CC3M-shaped records (ids, the pretrain instruction pool, 6-20 word captions) whose images come
from a pool of 64 small JPEGs (32 px; the processor still resizes to the tower's 336 px), as:

* ``records.jsonl`` plus ``images/`` (the JSON blob source; JSONL, so that writing 5M records stays cheap);
* a ``datasets.save_to_disk`` folder with every image embedded (the ``datasets`` Image feature);
* webdataset shards written by ``write_shards``, the converter behind ``llava-loop data convert shards``.

Then, in a fresh process per (source, size, repeat), it measures what a training run's data side does: the
time from process start to the first batch (import, records, processor, DataLoader with 4 workers); the RSS of
the main process and of each worker (and their USS: pages no other process shares) after the timed batches; and
samples/s through decode, encode and collate, timed once every worker has delivered its first batch. Medians over
the repeats.

    python bench/data_scale.py --sizes 595375 5000000 --repeats 3
    python bench/data_scale.py --sizes 595375 --parquet-row-groups 100 1000 122633   # Parquet random reads
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from records_load import WORDS  # noqa: E402

SOURCES = ("json", "arrow", "shards")
POOL = 64
PROCESSOR = "runs/bench-small-model"  # CLIP at 336 px (configs/bench_small.yaml builds it)


def pool_images(root: Path) -> list[bytes]:
    from PIL import Image

    rng = random.Random(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(POOL):
        path = images / f"img_{k:02d}.jpg"
        if not path.is_file():
            Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(path, quality=90)
    return [(images / f"img_{k:02d}.jpg").read_bytes() for k in range(POOL)]


def records(n: int):
    from llava_loop.demo.shapes import PROMPTS

    rng = random.Random(0)
    for i in range(n):
        prompt = rng.choice(PROMPTS)
        human = f"{prompt}\n<image>" if rng.random() < 0.5 else f"<image>\n{prompt}"
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + " ."
        yield {
            "id": f"GCC_train_{i:09d}",
            "image": f"img_{i % POOL:02d}.jpg",
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
        }


def write_jsonl(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for record in records(n):
            f.write(json.dumps(record) + "\n")


def write_arrow(out: Path, n: int, images: list[bytes]) -> None:
    """A save_to_disk folder with the Image feature, written in chunks (never all rows in memory)."""
    import datasets
    import pyarrow as pa

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    tmp = out.with_suffix(".tmp.arrow")
    schema = features.arrow_schema
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        chunk = []
        for record in records(n):
            k = int(record["image"][4:6])
            chunk.append({**record, "image": {"bytes": images[k], "path": record["image"]}})
            if len(chunk) == 50_000:
                writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
                chunk = []
        if chunk:
            writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
    datasets.Dataset.from_file(str(tmp)).save_to_disk(str(out), max_shard_size="1GB")
    tmp.unlink()


def prepare(root: Path, n: int, shard_size: str) -> dict:
    from llava_loop.data.shards import parse_size, write_shards

    root.mkdir(parents=True, exist_ok=True)
    images = pool_images(root)
    paths = {"json": root / "records.jsonl", "arrow": root / "arrow", "shards": root / "shards"}
    timings = {}
    for name, write in (
        ("json", lambda: write_jsonl(paths["json"], n)),
        ("arrow", lambda: write_arrow(paths["arrow"], n, images)),
        (
            "shards",
            lambda: write_shards(paths["json"], root / "images", paths["shards"], shard_size=parse_size(shard_size)),
        ),
    ):
        done = (
            paths[name] / "state.json"
            if name == "arrow"
            else paths[name] / "shards.json"
            if name == "shards"
            else paths[name]
        )
        if not done.exists():
            start = time.perf_counter()
            write()
            timings[name] = time.perf_counter() - start
            print(f"wrote {name} for {n:,} records in {timings[name]:.0f} s", file=sys.stderr, flush=True)
    return {name: str(p) for name, p in paths.items()}


def child(source: str, path: str, image_dir: str, batches: int, workers: int, micro_batch: int) -> None:
    """One measurement, in its own process; prints one JSON line."""
    import psutil

    began = psutil.Process().create_time()
    sys.path.insert(0, str(common.ROOT))
    from transformers import AutoProcessor

    from llava_loop.config import Config
    from llava_loop.loaders import make_datasets, make_train_loader, split_records

    cfg = Config()
    cfg.data.path, cfg.data.image_dir, cfg.data.num_workers = path, image_dir if source == "json" else "", workers
    cfg.data.max_length = 1024
    cfg.train.micro_batch_size = micro_batch
    opened = time.perf_counter()
    records = split_records(cfg)
    opened = time.perf_counter() - opened
    processor = AutoProcessor.from_pretrained(common.ROOT / PROCESSOR)
    dataset, _ = make_datasets(cfg, processor, records)
    loader, sampler = make_train_loader(dataset, cfg, world_size=1, pad_token_id=processor.tokenizer.pad_token_id)
    if sampler is not None:
        sampler.set_epoch(0)
    else:
        dataset.start(0, 0)
    iterator = iter(loader)
    next(iterator)
    first = time.time() - began
    for _ in range(workers - 1):  # every worker's first batch (a stream's start-up) is not throughput
        next(iterator)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(iterator)["ids"])
    rate = n / (time.perf_counter() - start)
    main, kids = psutil.Process(), psutil.Process().children()
    memory = [p.memory_full_info() for p in [main, *kids]]
    print(
        json.dumps(
            {
                "open_s": opened,
                "first_batch_s": first,
                "samples_per_s": rate,
                "main_rss_mib": memory[0].rss / 2**20,
                "main_uss_mib": memory[0].uss / 2**20,
                "worker_rss_mib": [m.rss / 2**20 for m in memory[1:]],
                "worker_uss_mib": [m.uss / 2**20 for m in memory[1:]],
            }
        ),
        flush=True,
    )


def parquet_random_reads(root: Path, row_groups: list[int], reads: int = 2000) -> list[list]:
    """Parquet of the Arrow set at each row-group size: microseconds per record read in a random order."""
    import datasets
    import numpy as np

    from llava_loop.data.sources import open_records

    rows = []
    table = datasets.load_from_disk(str(root / "arrow"))
    for size in row_groups:
        path = root / f"rows-{size}.parquet"
        table.to_parquet(str(path), batch_size=size)
        records = open_records(path)
        order = np.random.default_rng(0).permutation(len(records))[:reads]
        start = time.perf_counter()
        for i in order:
            records[int(i)]
        rows.append([f"{len(records):,}", f"{size:,}", f"{(time.perf_counter() - start) / reads * 1e6:.0f}"])
        path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[595_375, 5_000_000])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--shard-size", default="256MB")
    parser.add_argument("--root", default=str(common.ROOT / "runs" / "bench-scale"))
    parser.add_argument(
        "--parquet-row-groups",
        type=int,
        nargs="*",
        default=[],
        help="instead: time random reads of Parquet copies of the Arrow set at these row-group sizes",
    )
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "PATH", "IMAGE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.batches, args.workers, args.micro_batch)
        return
    sys.path.insert(0, str(common.ROOT))
    if args.parquet_row_groups:
        rows = [
            row for n in args.sizes for row in parquet_random_reads(Path(args.root) / str(n), args.parquet_row_groups)
        ]
        print(
            common.header(
                "Parquet: random reads by row-group size", "python bench/data_scale.py " + " ".join(sys.argv[1:])
            )
        )
        print(common.table(["records", "rows per group", "random read (us/record)"], rows))
        return
    rows = []
    for n in args.sizes:
        root = Path(args.root) / str(n)
        paths = prepare(root, n, args.shard_size)
        for source in args.sources:
            runs = []
            for _ in range(args.repeats):
                cmd = [
                    common.python(),
                    __file__,
                    "--child",
                    source,
                    paths[source],
                    str(root / "images"),
                    "--batches",
                    str(args.batches),
                    "--workers",
                    str(args.workers),
                    "--micro-batch",
                    str(args.micro_batch),
                ]
                runs.append(common.last_json_line(common.run_child(cmd, env={"OMP_NUM_THREADS": "1"})["stdout"]))
                print(json.dumps({"records": n, "source": source, **runs[-1]}), file=sys.stderr, flush=True)
            med = {
                key: common.median([r[key] for r in runs])
                for key in ("open_s", "first_batch_s", "samples_per_s", "main_rss_mib", "main_uss_mib")
            }
            workers_rss = [common.median([r["worker_rss_mib"][w] for r in runs]) for w in range(args.workers)]
            workers_uss = [common.median([r["worker_uss_mib"][w] for r in runs]) for w in range(args.workers)]
            rows.append(
                [
                    f"{n:,}",
                    source,
                    f"{med['open_s']:.1f}",
                    f"{med['first_batch_s']:.1f}",
                    f"{med['main_rss_mib']:.0f} / {med['main_uss_mib']:.0f}",
                    " ".join(f"{r:.0f}" for r in workers_rss),
                    " ".join(f"{u:.0f}" for u in workers_uss),
                    f"{med['samples_per_s']:.0f}",
                ]
            )
    print(
        common.header("Data at scale: JSON blob, Arrow, shards", "python bench/data_scale.py " + " ".join(sys.argv[1:]))
    )
    print(
        common.table(
            [
                "records",
                "source",
                "open records (s)",
                "first batch (s)",
                "main RSS / USS (MiB)",
                "worker RSS (MiB)",
                "worker USS (MiB)",
                "samples/s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
