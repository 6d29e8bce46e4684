"""The demo's fixture builder, run by the loop as a ``setup:`` entry before any records are read.

    setup:
      - fn: llava_loop.demo.fixtures:prepare
        kwargs: {preset: tiny, samples: 16000}

It makes what the config points at and does not find: tiny towers composed into ``model.path``, and
synthetic shapes records at ``data.path`` (and a tenth as many at ``data.eval_path``), their images in the
``images/`` folder beside them. It only creates what does not exist: an existing data path of any kind (a file,
a Parquet folder, anything) is the user's data and is left alone, so a second run reuses what the first made;
a folder it would have to write into (anything but an empty one) stops it with a UserError instead. Only a
records file (``.json``, ``.jsonl``) is ever made: a shard pattern, a Parquet or Arrow path, or a ``data.mix``
names the user's data, which the loader reports on if it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..folders import load
from .shapes import write_shapes
from .tiny import build_tiny, towers_beside

WHO = f"setup {__name__}:prepare"


def prepare(cfg, *, preset: str = "tiny", samples: int = 0) -> None:
    model = Path(cfg.model.path)
    if preset and not (model / "config.json").is_file():
        fix = "point model.path at a model directory, or at a path that does not exist to build one there"
        must_be_new(model, "model.path", f"is not a model directory (no config.json); {fix}")
        must_be_new(
            towers_beside(model),
            f"the tiny towers' folder for model.path {model}",
            "exists (left by an interrupted build?); move or delete it to build the tiny model there, or point "
            "model.path elsewhere",
        )
        build_tiny(model, preset)
    if not samples or cfg.data.mix:  # a mixture is the user's data, held-out set included
        return
    from transformers import AutoConfig

    size = load(AutoConfig, model, "model.path").vision_config.image_size  # images at the tower's resolution
    eval_images = cfg.data.eval_image_dir or cfg.data.image_dir
    splits = [
        ("data.path", cfg.data.path, "data.image_dir", cfg.data.image_dir, samples, cfg.train.seed, "train"),
        (
            "data.eval_path",
            cfg.data.eval_path,
            "data.eval_image_dir",
            eval_images,
            max(samples // 10, 32),
            cfg.train.seed + 1,
            "val",
        ),
    ]
    for key, json_path, image_key, image_dir, count, seed, prefix in splits:
        if not json_path or os.path.lexists(json_path) or not synthesizable(json_path):
            continue  # the user's data (missing or not), or what an earlier run made
        path = Path(json_path)
        images = path.parent / "images"  # where write_shapes puts them
        if not image_dir or Path(image_dir).resolve() != images.resolve():
            raise UserError(
                f"{WHO}: {key} {path} does not exist, and the synthetic shapes made there have their "
                f"images in {images}, but {image_key} is {image_dir!r}: set {image_key}={images}, or "
                f"point {key} at existing data"
            )
        must_be_new(
            images,
            f"the image folder for {key} {path}",
            f"exists and is not empty (left by an interrupted run?); move or delete it, or point {key} at "
            "existing data",
        )
        write_shapes(path.parent, count, seed=seed, size=size, prefix=prefix, json_name=path.name)


def synthesizable(path: str) -> bool:
    """A records file the shapes can be written as: ``.json`` or ``.jsonl``, no shard pattern or glob in it."""
    return Path(path).suffix in (".json", ".jsonl") and not any(c in path for c in "{}*?[")


def must_be_new(path: Path, what: str, why: str) -> None:
    """Refuse to write into ``path`` unless it does not exist or is an empty folder (nothing of the user's in it)."""
    empty_folder = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    if os.path.lexists(path) and not empty_folder:
        raise UserError(f"{WHO}: {what} {path} {why} (setup only creates what does not exist)")
