"""Webdataset tar shards: writing them (``llava-loop data convert shards``), counting them, and their samples as
records.

A sample is ``<key>.json`` (``{"id", "conversations", "images": [original names]}``) plus its images as
``<key>.<n>.<ext>`` (n = 0, 1, ... in tag order); keys are the record's position, so they never hold a dot.
The writer also leaves ``shards.json`` beside the shards: every shard's sample count, which the stream needs to
lay out an epoch without opening a shard, and the byte offset of every ``SEEK_EVERY``-th sample, so a stream can
start inside a shard without reading it from the top. Shards without it are counted from their tar headers (no
image bytes are read) and read from the top.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

from ..console import say_on_main
from ..errors import UserError
from .dataset import DataError
from .images import EmbeddedImage, image_path, open_checked
from .records import Record, RecordError, normalize_record
from .skips import SkipSample
from .sources import open_records

INDEX = "shards.json"
TAR_BLOCK, TAR_RECORD = 512, 10240
SEEK_EVERY = 1000  # shards.json keeps the byte offset of every 1000th sample: a resume reads at most that many
UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """``"200KB"``, ``"1GB"``, ``"1.5GiB"`` or a byte count -> bytes (KB/MB/GB are powers of 1000)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise UserError(f"--shard-size {text!r}: expected a size such as 200KB, 512MB, 1GB or 1GiB")
    size = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    if size <= 0:
        raise UserError(f"--shard-size {text!r}: must be positive, such as 200KB or 1GB")
    return size


def write_shards(
    records_path: str | Path,
    image_dir: str | Path,
    out: str | Path,
    *,
    shard_size: int,
    allow_absolute_paths: bool = False,
    seek_every: int = SEEK_EVERY,
) -> dict:
    """Write ``out/000000.tar, 000001.tar, ...`` of at most ``shard_size`` bytes each (``ShardSink``) and
    ``out/shards.json``. Records whose images cannot be read are left out and counted by
    reason (as training would skip them); returns ``{"shards", "samples", "skipped", "examples"}``."""
    records = open_records(records_path)  # structural problems stop here, naming the record
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise UserError(f"{out} already holds .tar shards; write to an empty folder")
    sink = ShardSink(out, shard_size, seek_every)
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    with sink:
        for i in range(len(records)):
            record = records[i]
            try:
                if record.video is not None:  # shards carry images as members only
                    raise SkipSample("malformed_record", "a video record; train videos from JSON or Parquet records")
                sample = {"__key__": f"{i:09d}", "json": record_json(record)}
                for n, name in enumerate(record.images):
                    path = image_path(image_dir, name, allow_absolute=allow_absolute_paths)
                    open_checked(path, decode=False)  # header checks; a corrupt body still fails in training
                    sample[f"{n}{Path(name).suffix.lower() or '.img'}"] = path.read_bytes()
            except SkipSample as skip:
                skipped[skip.reason] += 1
                examples.setdefault(skip.reason, f"{record.id}: {skip.detail}")
                continue
            sink.write(sample)
    counts = sink.counts
    shards = [
        {"name": name, "samples": n, "bytes": (out / name).stat().st_size, "offsets": sink.offsets[name]}
        for name, n in sorted(counts.items())
    ]
    (out / INDEX).write_text(json.dumps({"source": str(records_path), "seek_every": seek_every, "shards": shards}))
    return {"shards": len(shards), "samples": sum(counts.values()), "skipped": dict(skipped), "examples": examples}


class ShardSink:
    """``out/000000.tar, 000001.tar, ...``: a shard is closed before a sample would take it past ``limit`` bytes
    on disk (tar headers, padding and end blocks included); a sample larger than that gets a shard of its own."""

    def __init__(self, out: Path, limit: int, seek_every: int = SEEK_EVERY):
        self.out, self.limit, self.seek_every = out, limit, seek_every
        self.counts: dict[str, int] = {}
        self.offsets: dict[str, list[int]] = {}  # byte offset of every seek_every-th sample, per shard
        self.file = self.writer = None
        self.used = 0

    @staticmethod
    def tar_bytes(sample: dict) -> int:
        return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in sample.items() if k != "__key__")

    def write(self, sample: dict) -> None:
        import webdataset as wds

        need = self.tar_bytes(sample)
        if self.writer is None or (self.used and _on_disk(self.used + need) > self.limit):
            self.close()
            name = f"{len(self.counts):06d}.tar"
            self.file = open(self.out / name, "wb")
            self.writer, self.used = wds.TarWriter(self.file, encoder=False, mtime=0), 0
            self.counts[name], self.offsets[name] = 0, []
        name = f"{len(self.counts) - 1:06d}.tar"
        if self.counts[name] % self.seek_every == 0:
            self.offsets[name].append(self.writer.tarstream.offset)  # the tar's position; the file lags (buffered)
        self.writer.write(sample)
        self.used += need
        self.counts[name] += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _on_disk(used: int) -> int:
    """A tar file's size: its members, two zero end blocks, padded to tar's 10 KiB records."""
    return -(-(used + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def record_json(record: Record) -> bytes:
    names = [str(name) for name in record.images]
    conversations = [{"from": role, "value": text} for role, text in record.turns]
    return json.dumps({"id": record.id, "conversations": conversations, "images": names}, ensure_ascii=False).encode()


def expand(pattern: str | Path) -> list[Path]:
    """The shard files ``data.path`` names: a brace pattern, one .tar, or a folder of .tar files."""
    text = str(pattern)
    if Path(text).is_dir():
        files = sorted(Path(text).glob("*.tar"))
    else:
        import braceexpand

        files = [Path(p) for p in braceexpand.braceexpand(text)]
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise RecordError(
            f"data.path={text}: {len(missing)} of {len(files)} shards not found (e.g. "
            f"{missing[0] if missing else text}); check the pattern and that the shared filesystem is "
            "mounted"
        )
    return files


def sample_key(name: str) -> str | None:
    """The sample a tar member belongs to, as webdataset groups them: the name up to the first dot."""
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.split(".", 1)[0] if "." in base else None


def count_samples(shard: Path) -> int:
    """Samples in a shard from its tar headers alone (tarfile seeks past every member's data)."""
    keys, last, member = 0, None, None
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                key = sample_key(member.name) if member.isreg() else None
                if key is not None and key != last:
                    keys, last = keys + 1, key
    except tarfile.TarError as exc:
        size = shard.stat().st_size
        if member is not None and member.offset_data + member.size > size:
            where = (
                f"byte {member.offset} (member {member.name}: {member.size} bytes of data from byte "
                f"{member.offset_data}, but the file ends at byte {size})"
            )
        else:
            where = f"byte {member.offset_data + member.size if member else 0} of {size}"
        raise DataError(
            f"{shard}: truncated or corrupt at {where}; {exc}, {keys} samples read before it. Copy it "
            "again or rewrite the shards (llava-loop data convert shards), or move it out of data.path "
            "to go on without it"
        ) from None
    return keys


def read_index(files: list[Path]) -> tuple[list[int], list[tuple[int, list[int]] | None]]:
    """Samples per shard and its seek points ``(every, offsets)``: from ``shards.json`` beside them when it lists
    them all, else counted from the tar headers (and no seek points)."""
    index_file = files[0].parent / INDEX
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        listed = {s["name"]: s for s in index["shards"]}
        if all(f.name in listed for f in files):
            every = index.get("seek_every")
            return (
                [listed[f.name]["samples"] for f in files],
                [
                    (every, listed[f.name]["offsets"]) if every and listed[f.name].get("offsets") else None
                    for f in files
                ],
            )
    return [count_samples(f) for f in files], [None for _ in files]


def damaged_shards(files: list[Path]) -> list[tuple[Path, int, int, int]]:
    """``(shard, bytes shards.json recorded, bytes on disk, samples it recorded)`` of every shard whose size
    changed since it was written (truncated by a failed copy, overwritten); none without ``shards.json``."""
    index_file = files[0].parent / INDEX
    if not index_file.is_file():
        return []
    listed = {s["name"]: s for s in json.loads(index_file.read_text())["shards"]}
    damaged = []
    for f in files:
        entry = listed.get(f.name, {})
        if entry.get("bytes") is not None and f.stat().st_size != entry["bytes"]:
            damaged.append((f, entry["bytes"], f.stat().st_size, entry.get("samples", 0)))
    return damaged


def usable_shards(files: list[Path], *, skip_damaged: bool) -> list[Path]:
    """The shards to stream: all of them, unless some are damaged (``damaged_shards``). Those are refused, all
    named, before anything is read; with ``data.skip_damaged_shards`` they are left out, each named."""
    damaged = damaged_shards(files)
    if not damaged:
        return files
    lines = "; ".join(f"{f} is {actual:,} bytes, {INDEX} says {expected:,}" for f, expected, actual, _ in damaged)
    if not skip_damaged:
        raise DataError(
            f"{len(damaged)} of {len(files)} shards are damaged (truncated or overwritten since they "
            f"were written): {lines}. Copy them again, or rewrite the shards (llava-loop data convert "
            "shards); or set data.skip_damaged_shards=true to train without them (each is left out whole; "
            "a resumed run continues its epoch without them)"
        )
    kept = [f for f in files if f not in {d[0] for d in damaged}]
    if not kept:
        raise DataError(f"every shard is damaged: {lines}; copy them again or rewrite them")
    samples = sum(d[3] for d in damaged)
    say_on_main(
        f"[yellow]warning:[/yellow] data.skip_damaged_shards: training without {len(damaged)} damaged "
        f"shards ({samples:,} samples left out): {lines}"
    )
    return kept


def shard_counts(files: list[Path]) -> list[int]:
    return read_index(files)[0]


def iter_shard(shard: Path, skip: int = 0, seek: tuple[int, list[int]] | None = None):
    """A shard's samples from the ``skip``-th on, as webdataset groups them: ``{"__key__", "json": bytes,
    "0.jpg": bytes, ...}``. With seek points (``read_index``) it jumps to the nearest one at or before ``skip``."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    every, offsets = seek or (1, [0])
    jump = min(skip // every, len(offsets) - 1)
    with open(shard, "rb") as stream:
        stream.seek(offsets[jump])  # a tar read from a member header on is a valid tar stream
        members = ({**member, "__url__": str(shard)} for member in tar_file_iterator(stream))
        try:
            yield from islice(group_by_keys(members), skip - jump * every, None)
        except tarfile.TarError as exc:
            why = str(exc).split(" @ ")[0]  # webdataset appends the stream's repr
            raise DataError(
                f"{shard} cannot be read from byte {offsets[jump]}: {why} at byte {stream.tell()} of "
                f"{shard.stat().st_size}. The shard is damaged (copy it again, or rewrite the shards with "
                f"llava-loop data convert shards) or {INDEX} beside it is stale (delete {INDEX} to read "
                "the shards without it)"
            ) from None


def sample_record(sample: dict) -> Record:
    """One shard sample -> Record with embedded images; a broken sample becomes ``SkipSample``."""
    where = f"{sample['__url__']}: sample {sample['__key__']}"
    try:
        raw = json.loads(sample["json"])
    except (KeyError, ValueError) as exc:
        raise SkipSample("malformed_record", f"{where}: no readable .json member ({exc})") from None
    images = sorted((k for k in sample if re.match(r"\d+\.", k)), key=lambda k: int(k.split(".")[0]))
    if isinstance(raw, dict):
        raw.pop("images", None)
        raw["image"] = [EmbeddedImage(f"{where}.{k}", sample[k]) for k in images]
    try:
        return normalize_record(raw, Path(sample["__url__"]), sample["__key__"])
    except RecordError as exc:
        raise SkipSample("malformed_record", str(exc)) from None
