"""Benchmark 13, `data prepare` and images read from a zip in place: a synthetic LLaVA-CC3M-shaped download
(``chat.json`` + ``images.zip`` of JPEGs at the zip's root) is prepared, then every image is read and decoded the way
a DataLoader worker reads it (``image_path`` + ``load_image``), from the zip and from the same files extracted to a
folder, in alternating passes (the machine is shared: medians of the passes, side by side).

    python bench/prepare.py                        # the BENCHMARKS row: 10,000 records of 336 px JPEGs
    python bench/prepare.py --records 2000         # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from llava_loop.data.images import image_path, load_image  # noqa: E402
from llava_loop.data.prepare import prepare  # noqa: E402


def jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A photo-like JPEG: smooth colour plus noise, so it compresses as photos do (tens of KB at 336 px)."""
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((side, side), Image.BICUBIC)
    noise = rng.integers(-12, 13, (side, side, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def download(root: Path, n: int, side: int) -> Path:
    src = root / "download"
    src.mkdir()
    rng = np.random.default_rng(0)
    records = []
    with zipfile.ZipFile(src / "images.zip", "w") as zf:  # stored: JPEGs do not deflate
        for i in range(n):
            name = f"GCC_train_{i:09d}.jpg"
            zf.writestr(name, jpeg(rng, side))
            turns = [{"from": "human", "value": "<image>\nDescribe the image briefly."}]
            turns.append({"from": "gpt", "value": f"a synthetic photo number {i}"})
            records.append({"id": name[:-4], "image": name, "conversations": turns})
    (src / "chat.json").write_text(json.dumps(records))
    return src


def read_all(image_dir: Path, names: list[str]) -> float:
    """Seconds to open and decode every image as training does."""
    start = time.perf_counter()
    for name in names:
        load_image(image_path(image_dir, name))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=336)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = download(root, args.records, args.side)
        zip_mib = (src / "images.zip").stat().st_size / 2**20
        start = time.perf_counter()
        manifest = prepare("llava-cc3m-595k", src, root / "prepared", say=lambda text: None)
        prepare_s = time.perf_counter() - start
        zipped = [
            json.loads(line)["image"] for line in (root / "prepared" / "records.jsonl").read_text().split("\n") if line
        ]
        folder = root / "extracted"
        with zipfile.ZipFile(src / "images.zip") as zf:
            zf.extractall(folder)
        names = [Path(z).name for z in zipped]
        from_zip, from_files = [], []
        for _ in range(args.passes):  # alternating, so load drifts hit both alike
            from_zip.append(read_all(src, zipped))
            from_files.append(read_all(folder, names))
    n = manifest["records"]
    zip_rate, file_rate = n / common.median(from_zip), n / common.median(from_files)
    print(common.header("Benchmark 13: data prepare, and images read from a zip in place", "python bench/prepare.py"))
    print(f"{n:,} records, {args.side} px JPEGs, images.zip {zip_mib:,.0f} MiB (stored)\n")
    print(
        common.table(
            ["step", "seconds", "per second"],
            [
                [
                    "prepare (parse, find, header-check every image, write)",
                    f"{prepare_s:.1f}",
                    f"{n / prepare_s:,.0f} records",
                ],
                [
                    f"read + decode all, from the zip (median of {args.passes})",
                    f"{common.median(from_zip):.1f}",
                    f"{zip_rate:,.0f} images",
                ],
                [
                    f"read + decode all, extracted files (median of {args.passes})",
                    f"{common.median(from_files):.1f}",
                    f"{file_rate:,.0f} images",
                ],
            ],
        )
    )
    print(f"\nzip / files read rate: {zip_rate / file_rate:.2f}x")


if __name__ == "__main__":
    main()
