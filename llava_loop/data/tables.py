"""Records read in place from Arrow and Parquet: a ``datasets.save_to_disk`` folder or Parquet files.

Columns: ``conversations`` (or ``messages``), an optional ``id``, and ``image`` (or ``images``) as a path relative
to the image folder, embedded bytes, the ``{bytes, path}`` struct that the ``datasets`` Image feature writes, or a
list of these. Nothing is converted or copied:

* a ``save_to_disk`` folder is opened with ``datasets.load_from_disk``: memory-mapped Arrow, which forked DataLoader
  workers share through the page cache without copies;
* Parquet is compressed column chunks, which cannot be memory-mapped row by row. Rows are read through pyarrow's
  (memory-mapped) ``ParquetFile`` one row group at a time, and the last row group read is kept per process: random
  access decodes a whole row group per sample. At 100 rows per group a random read costs about 0.5 ms; at the
  122K rows per group that ``Dataset.to_parquet`` wrote for a 595K-row image set, 35 ms (docs/BENCHMARKS.md,
  section 9). Opening a file whose row groups exceed ``LARGE_ROW_GROUP`` rows warns, naming the fix.

Rows are validated when they are read, not at startup (5M rows would take minutes): a structurally broken row is
skipped and counted as ``malformed_record``, like any other bad sample; ``llava-loop data check`` reads them all.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from .images import EmbeddedImage
from .records import Record, RecordError, normalize_record
from .skips import SkipSample

TEXT_COLUMNS = ("conversations", "messages")
LARGE_ROW_GROUP = 1000
IMAGE_COLUMNS = ("image", "images")
VIDEO_COLUMNS = ("video", "video_start", "video_end")  # a path (or frame paths) under the image folder, a window
KEPT_COLUMNS = TEXT_COLUMNS + IMAGE_COLUMNS + VIDEO_COLUMNS + ("id",)


def image_refs(value, where: str):
    """A row's image cell as paths (str) and ``EmbeddedImage``s; anything else is returned as is, for
    ``normalize_record`` to refuse."""
    if isinstance(value, list):
        return [image_refs(v, f"{where} image {i}") for i, v in enumerate(value)]
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:  # the datasets Image feature's struct
        if value.get("bytes"):
            return EmbeddedImage(f"{where} ({value.get('path') or 'embedded'})", value["bytes"])
        return value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return EmbeddedImage(where, bytes(value))
    return value


def clean_messages(messages):
    """Arrow structs carry every key of the column's schema, absent ones as None (``from`` beside ``role``)."""
    if isinstance(messages, list):
        return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    return messages


def row_record(row: dict, source: str, index: int) -> Record:
    """One table row -> Record; a structurally broken row becomes ``SkipSample("malformed_record")``."""
    where = f"{source} row {index}"
    raw = {
        "id": row.get("id") if row.get("id") is not None else index,
        "conversations": clean_messages(row.get("conversations", row.get("messages"))),
    }
    image = row.get("image", row.get("images"))
    if image is not None:
        raw["image"] = image_refs(image, where)
    raw.update({key: row[key] for key in VIDEO_COLUMNS if row.get(key) is not None})
    try:
        return normalize_record(raw, Path(source), index)
    except RecordError as exc:
        raise SkipSample("malformed_record", str(exc)) from None


def check_columns(names, source: str) -> None:
    if not any(c in names for c in TEXT_COLUMNS):
        raise RecordError(
            f"{source}: no 'conversations' or 'messages' column (columns: {sorted(names)}); each row "
            "needs conversations=[{from, value}, ...], with the image in an 'image' column"
        )


class ArrowRows:
    """Rows of a ``datasets.save_to_disk`` folder, memory-mapped; images come back as stored (no decoding)."""

    def __init__(self, path: Path):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise RecordError(
                f"{path} holds several splits ({', '.join(dataset)}); set data.path to one of them, "
                f"e.g. {path / next(iter(dataset))}"
            )
        check_columns(dataset.column_names, str(path))
        self.table = dataset.with_format("arrow")  # rows as Arrow slices: the Image feature is not decoded
        self.files = [Path(f["filename"]) for f in dataset.cache_files]
        self.columns = [c for c in dataset.column_names if c in KEPT_COLUMNS]
        self.holds_video = "video" in self.columns

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        return self.table[index].select(self.columns).to_pylist()[0]


class ParquetRows:
    """Rows of one or more Parquet files, read by row group through pyarrow; the last row group is cached."""

    def __init__(self, files: list[Path]):
        import pyarrow.parquet as pq

        self.files = files
        self._open: dict[int, object] = {}
        counts, groups, self.columns = [], [], []
        for f, file in enumerate(files):
            parquet = pq.ParquetFile(file, memory_map=True)
            meta, names = parquet.metadata, parquet.schema_arrow.names
            check_columns(names, str(file))
            # each file's own columns: a folder's files may differ (a text-only part, `images` beside `image`)
            self.columns.append([c for c in names if c in KEPT_COLUMNS])
            for g in range(meta.num_row_groups):
                counts.append(meta.row_group(g).num_rows)
                groups.append((f, g))
            largest = max((meta.row_group(g).num_rows for g in range(meta.num_row_groups)), default=0)
            if largest > LARGE_ROW_GROUP:
                warnings.warn(
                    f"{file}: row groups of up to {largest} rows, and every random read decodes a whole "
                    "group, so training will read it slowly; rewrite it with row groups of about 100 rows "
                    "(datasets: ds.to_parquet(path, batch_size=100); pyarrow: row_group_size=100), or use "
                    "a save_to_disk folder or shards",
                    stacklevel=2,
                )
        self.holds_video = any("video" in columns for columns in self.columns)
        self.groups = groups
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._cached: tuple[int, object] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        group = int(np.searchsorted(self.starts, index, side="right")) - 1
        if self._cached is None or self._cached[0] != group:
            f, g = self.groups[group]
            if f not in self._open:  # opened lazily: each forked worker gets its own file handles
                import pyarrow.parquet as pq

                self._open[f] = pq.ParquetFile(self.files[f], memory_map=True)
            self._cached = group, self._open[f].read_row_group(g, columns=self.columns[f])
        return self._cached[1].slice(index - int(self.starts[group]), 1).to_pylist()[0]

    def __getstate__(self):  # workers reopen the files themselves
        return {**self.__dict__, "_open": {}, "_cached": None}


class TableRecords:
    """The ``Records`` interface (len, getitem -> Record, subset, fingerprint, source) over table rows."""

    def __init__(self, rows, source: str, index: np.ndarray | None = None):
        self.rows = rows
        self.source = source
        self._index = index

    def __len__(self) -> int:
        return len(self.rows) if self._index is None else len(self._index)

    def __getitem__(self, index: int) -> Record:
        if self._index is not None:
            index = int(self._index[index])
        return row_record(self.rows[index], self.source, index)

    @property
    def holds_video(self) -> bool:
        """Whether a video column is there (its rows may still have none, or name frame images)."""
        return self.rows.holds_video

    holds_video_files = holds_video

    def subset(self, indices) -> TableRecords:
        base = np.asarray(indices, dtype=np.int64)
        return TableRecords(self.rows, self.source, base if self._index is None else self._index[base])

    def fingerprint(self) -> str:
        """A digest of these rows' files (path, size, modification time) and of the selection, for caches."""
        digest = hashlib.sha256("\n".join(file_stamp(f) for f in self.rows.files).encode())
        if self._index is not None:
            digest.update(self._index.tobytes())
        return digest.hexdigest()


def file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def parquet_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise RecordError(f"{path}: no .parquet files found; set data.path to a Parquet file or a folder of them")
    return files


def load_table_records(path: str | Path, kind: str) -> TableRecords:
    path = Path(path)
    rows = ArrowRows(path) if kind == "arrow" else ParquetRows(parquet_files(path))
    if not len(rows):
        raise RecordError(f"{path}: no records")
    return TableRecords(rows, str(path))
