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


def _pair_choice_accuracy(checkpoint, val_json, image_dir):
    """For each held-out two-image record, does the trained model find the right answer ("the first ." or "the
    second .") more likely than the wrong one? Scored by the loss of each answer, teacher-forced."""
    from llava_loop.data.collate import Collator
    from llava_loop.data.dataset import LlavaDataset
    from llava_loop.data.records import Record, Records, load_records
    from llava_loop.demo.shapes import PAIR_ANSWERS
    from llava_loop.export import load_trained
    from llava_loop.losses import label_only_ce

    model, processor, _, _ = load_trained(checkpoint)
    encoder = SampleEncoder(processor, max_length=512)
    collate = Collator(processor.tokenizer.pad_token_id)
    records = load_records(val_json)
    correct = 0
    for i in range(len(records)):
        record = records[i]
        options = [Record(record.id, record.images, record.turns[:1] + (("assistant", a),)) for a in PAIR_ANSWERS]
        dataset = LlavaDataset(Records.from_records(options), encoder, image_dir)
        with torch.no_grad():
            losses = [float(label_only_ce(model, collate([dataset[k]]))["loss"]) for k in range(2)]
        correct += PAIR_ANSWERS[losses.index(min(losses))] == record.turns[1][1]
    return correct / len(records)


@pytest.mark.slow
def test_the_model_learns_to_tell_two_images_apart(tmp_path, tiny_model_dir, monkeypatch, fresh_accelerate_state):
    """Two-image records ("which image has the red circle?"): trained, the model picks the right image; with the
    pixels zeroed (the negative control) it cannot do better than chance."""
    import helpers
    from llava_loop.checkpoint import complete_checkpoints
    from llava_loop.config import load_config
    from llava_loop.demo.shapes import write_shapes
    from llava_loop.loop import train

    data = {"train": write_shapes(tmp_path / "train", 1600, seed=0, size=64, pair_ratio=1.0, prefix="train"),
            "val": write_shapes(tmp_path / "val", 64, seed=1, size=64, pair_ratio=1.0, prefix="val"),
            "train_images": tmp_path / "train" / "images", "val_images": tmp_path / "val" / "images"}
    accuracy = {}
    for run in ("pixels", "zeroed"):
        if run == "zeroed":
            monkeypatch.setattr(SampleEncoder, "pixel_values", lambda self, image: torch.zeros(3, 64, 64))
        path = helpers.write_config(tmp_path / f"{run}.yaml", model=tiny_model_dir, data=data, output_dir=tmp_path / run,
                                    train={"max_steps": 200, "micro_batch_size": 16, "lr": 1e-3, "seed": 0},
                                    checkpoint={"every": 200, "keep_last": 1})
        train(load_config(path))
        accuracy[run] = _pair_choice_accuracy(complete_checkpoints(tmp_path / run)[-1], data["val"], data["val_images"])
    assert accuracy["pixels"] >= 0.9, accuracy
    assert accuracy["zeroed"] <= 0.7, accuracy
