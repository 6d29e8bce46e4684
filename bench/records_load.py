"""Benchmark: loading and validating a LLaVA-CC3M-Pretrain-595K-sized chat.json (text only).

Writes a synthetic 595,375-record chat.json shaped like the real one (ids, image names, the pretrain
instruction pool with <image> at the start or the end, 6-20 word captions), then times ``load_records``
(parse + structural validation + compact storage) and the content checks the encoder applies to every
record (roles, <image> count, empty answers), and reports the peak RSS and the stored size.

    python bench/records_load.py
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORDS = (
    "the a of and in on with at man woman dog cat city street car tree house red blue green old young small "
    "large photo view people group water beach snow mountain building sky night light white black table"
).split()


def write_chat(path: Path, n: int) -> None:
    from llava_loop.demo.shapes import PROMPTS

    rng = random.Random(0)
    records = []
    for i in range(n):
        prompt = rng.choice(PROMPTS)
        human = f"{prompt}\n<image>" if rng.random() < 0.5 else f"<image>\n{prompt}"
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + " ."
        records.append(
            {
                "id": f"GCC_train_{i:09d}",
                "image": f"GCC_train_{i:09d}.jpg",
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=595_375)
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.data.encode import record_messages
    from llava_loop.data.records import load_records

    path = common.ROOT / "runs" / "bench-595k" / "chat.json"
    if not path.is_file():
        write_chat(path, args.n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    records = load_records(path)
    loaded = time.perf_counter() - start
    for i in range(len(records)):
        record_messages(records[i])
    validated = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(common.header("Loading a 595K-record chat.json", "python bench/records_load.py " + " ".join(sys.argv[1:])))
    print(
        common.table(
            ["records", "file (MB)", "load + structure (s)", "+ content checks (s)", "stored (MB)", "peak RSS (MiB)"],
            [
                [
                    f"{len(records):,}",
                    f"{path.stat().st_size / 1e6:.0f}",
                    f"{loaded:.1f}",
                    f"{validated:.1f}",
                    f"{records.nbytes() / 1e6:.0f}",
                    f"{max(peak, before):.0f}",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
