"""Loading a model folder's config, tokenizer and processors with transformers' own classes only.

A folder whose JSON files name classes of its own (``auto_map``) would make transformers ask, on a terminal,
whether to run that folder's Python, and fail without one. llava_loop never runs it and never asks: every load
passes ``trust_remote_code=False``. A folder of an architecture transformers has is loaded with transformers' class
(its own code ignored, as ``build`` drops ``auto_map`` from what it writes); one that cannot load without its code is
refused, naming the folder, the classes and the way out.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

JSON_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


class RemoteCodeRefused(UserError):
    """A model folder needs its own Python to load."""


def custom_classes(path: Path) -> list[str]:
    """``file: AutoX -> module.Class`` for each class the folder's JSON files map to code of its own."""
    found = []
    for name in JSON_FILES:
        try:
            data = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        for auto, target in (auto_map or {}).items():
            targets = [t for t in (target if isinstance(target, list) else [target]) if t]
            found += [f"{name}: {auto} -> {t}" for t in targets]
    return found


def load(loader, path, what: str, **kwargs):
    """``loader.from_pretrained(path, trust_remote_code=False, **kwargs)``; ``what`` names where the folder came from
    (``--llm``, ``model.path``) in the refusal of one that needs its own code."""
    try:
        return loader.from_pretrained(path, trust_remote_code=False, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        classes = "; ".join(custom_classes(path)) or "custom code"
        raise RemoteCodeRefused(
            f"{what} {path}: it loads only with its own Python ({classes}), which llava_loop never runs. Use a "
            "checkpoint of an architecture transformers supports, or convert this one to it"
        ) from None
