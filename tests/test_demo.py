"""The built-in demo learns from pixels: a bounded run reaches held-out colour accuracy far above chance, and
the same run with the pixels zeroed does not (the negative control)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_loop.data.encode import SampleEncoder
from llava_loop.demo.pipeline import run_demo


def _overrides(tmp_path):
    """The demo config with a smaller data set so training takes well under 2 minutes here."""
    return [
        f"model.path={tmp_path / 'tiny'}", f"output_dir={tmp_path / 'demo'}",
        f"data.path={tmp_path / 'data/train/chat.json'}", f"data.image_dir={tmp_path / 'data/train/images'}",
        f"data.eval_path={tmp_path / 'data/val/chat.json'}", f"data.eval_image_dir={tmp_path / 'data/val/images'}",
        "setup=[{fn: llava_loop.demo.fixtures:prepare, kwargs: {preset: tiny, samples: 3200}}]", "data.num_workers=0", "train.epochs=2", "train.time_limit_minutes=2",
        "eval.every=50", "eval.max_samples=160",
    ]


@pytest.mark.slow
def test_demo_learns_colour_from_pixels_and_writes_a_report(tmp_path, fresh_accelerate_state):
    results = run_demo(overrides=_overrides(tmp_path))
    before, after = results["before"], results["after"]
    assert before["color_accuracy"] < 0.4  # untrained: near chance (1/7)
    assert after["color_accuracy"] >= 0.8
    assert after["eval_loss"] < before["eval_loss"]
    with Image.open(results["report"]) as report:
        assert report.width >= 800 and report.height >= 1000
        assert len(set(report.convert("L").getdata())) > 50  # curves, text and images, not a blank page


@pytest.mark.slow
def test_with_pixels_zeroed_the_demo_stays_at_chance(tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setattr(SampleEncoder, "pixel_values", lambda self, image: torch.zeros(3, 64, 64))
    results = run_demo(overrides=_overrides(tmp_path))
    assert results["after"]["color_accuracy"] < 0.4

