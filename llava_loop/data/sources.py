"""What ``data.path`` names, and the one place that opens it.

* ``json``: a chat.json list, JSONL or ``{"data": [...]}`` (records.py, the compact in-memory blob), or a folder
  ``llava-loop data prepare`` made (its ``records.jsonl``; its images' folder is the default ``data.image_dir``);
* ``parquet``: a ``.parquet`` file or a folder of them; ``arrow``: a ``datasets.save_to_disk`` folder (tables.py);
* ``shards``: webdataset tar shards, as a brace pattern (``shards/{000000..000127}.tar``), one ``.tar``, or a folder
  of them (stream.py); read as a stream, never all at once.

The first three are map-style (random access: ``open_records``); shards are streamed.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import UserError
from .records import RecordError, load_records

DATA_EXTRA = "pip install 'llava-loop[data]'"
PREPARED_MANIFEST, PREPARED_RECORDS = "prepared.json", "records.jsonl"  # what data/prepare.py writes


def prepared_manifest(path: str | Path) -> dict | None:
    """The manifest of a folder ``data prepare`` completed, else None."""
    manifest = Path(path) / PREPARED_MANIFEST
    if not manifest.is_file():
        return None
    again = "prepare the folder again (llava-loop data prepare ... --force)"
    try:
        made = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise RecordError(f"{manifest} is not valid JSON; {again}") from None
    if not isinstance(made, dict):
        raise RecordError(f"{manifest} holds a {type(made).__name__}, not data prepare's manifest; {again}")
    image_dir = made.get("image_dir")
    if not isinstance(image_dir, str) or not image_dir:
        raise RecordError(
            f"{manifest}: its image_dir is {image_dir!r}, not the path of the images' folder; {again}, or set "
            "data.image_dir to that folder"
        )
    return made


def image_dir_of(path: str | Path, image_dir: str | Path = "") -> str:
    """The image folder for the records at ``path``: ``image_dir`` when given, else a prepared folder's own."""
    if image_dir or not path:
        return str(image_dir)
    manifest = prepared_manifest(path)
    return manifest.get("image_dir", "") if manifest else ""


def source_kind(path: str | Path) -> str:
    text = str(path)
    p = Path(text)
    if text.endswith(".tar") or ("{" in text and ".tar" in text):
        return "shards"
    if p.is_dir():
        if (p / PREPARED_MANIFEST).is_file():
            return "json"
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "arrow"
        if any(p.glob("*.tar")):
            return "shards"
        if any(p.rglob("*.parquet")):
            return "parquet"
        raise RecordError(
            f"{p} is a folder with no .parquet files, no .tar shards and no datasets save_to_disk "
            "files; set data.path to a chat.json/.jsonl file, Parquet, a save_to_disk folder or shards"
        )
    if p.suffix == ".parquet":
        return "parquet"
    return "json"


def require_data_extra(kind: str, path) -> None:
    """Parquet, Arrow and shards need the ``data`` extra; say how to get it."""
    needs = {"parquet": ("pyarrow",), "arrow": ("datasets",), "shards": ("webdataset", "braceexpand")}[kind]
    missing = []
    for module in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"data.path={path} is {kind} data, which needs {', '.join(missing)}: {DATA_EXTRA}")


def open_records(path: str | Path):
    """The records of a map-style source: ``Records`` (JSON) or ``TableRecords`` (Parquet, Arrow)."""
    kind = source_kind(path)
    if kind == "json":
        return load_records(Path(path) / PREPARED_RECORDS if Path(path).is_dir() else path)
    if kind == "shards":
        raise RecordError(
            f"{path} is webdataset shards, which are streamed; they cannot serve as held-out records "
            "(data.eval_path) or be split by eval.holdout: give held-out records as JSON, Parquet or Arrow"
        )
    require_data_extra(kind, path)
    from .tables import load_table_records

    return load_table_records(path, kind)
