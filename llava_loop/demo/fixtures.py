"""The demo's fixture builder, run by the loop as a ``setup:`` entry before any records are read.

    setup:
      - fn: llava_loop.demo.fixtures:prepare
        kwargs: {preset: tiny, samples: 16000}

It makes what the config points at and does not find: tiny towers composed into ``model.path``, and
synthetic shapes records at ``data.path`` (and a tenth as many at ``data.eval_path``). Existing files are
left alone, so a second run reuses them.
"""

from __future__ import annotations

from pathlib import Path

from .shapes import write_shapes
from .tiny import build_tiny


def prepare(cfg, *, preset: str = "tiny", samples: int = 0) -> None:
    if preset and not (Path(cfg.model.path) / "config.json").is_file():
        build_tiny(cfg.model.path, preset)
    if not samples:
        return
    from transformers import AutoConfig

    size = AutoConfig.from_pretrained(cfg.model.path).vision_config.image_size  # images at the tower's resolution
    splits = [(cfg.data.path, samples, cfg.train.seed, "train"),
              (cfg.data.eval_path, max(samples // 10, 32), cfg.train.seed + 1, "val")]
    for json_path, count, seed, prefix in splits:
        path = Path(json_path)
        if json_path and not path.is_file():
            write_shapes(path.parent, count, seed=seed, size=size, prefix=prefix, json_name=path.name)
