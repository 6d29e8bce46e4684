"""``data.mix``: several sources in one run, each record seen ``weight`` times per epoch, drawn by (seed, epoch);
per-source counts in metrics.jsonl; token budgets and packing; bitwise resume across an epoch boundary."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from llava_loop.config import ConfigError, load_config
from llava_loop.data.dataset import LlavaDataset
from llava_loop.data.mixture import MixedDataset, Mixture
from llava_loop.data.records import load_records
from llava_loop.errors import UserError

import helpers


def test_each_record_is_drawn_weight_times_per_epoch_by_seed_and_epoch():
    mixture = Mixture([10, 6, 8], [2.0, 1.0, 0.5], seed=3)
    assert len(mixture) == 20 + 6 + 4
    draws = {epoch: mixture.epoch_indices(epoch) for epoch in range(3)}
    for indices in draws.values():
        counts = Counter(indices.tolist())
        assert all(counts[i] == 2 for i in range(10)) and all(counts[i] == 1 for i in range(10, 16))
        assert len([i for i in counts if i >= 16]) == 4 and all(16 <= i < 24 for i in counts if i >= 16)
    halves = [frozenset(i for i in draws[e].tolist() if i >= 16) for e in range(3)]
    assert len(set(halves)) > 1  # the half is drawn afresh each epoch
    assert np.array_equal(Mixture([10, 6, 8], [2.0, 1.0, 0.5], seed=3).epoch_indices(1), draws[1])  # by seed, epoch
    assert not np.array_equal(Mixture([10, 6, 8], [2.0, 1.0, 0.5], seed=4).epoch_indices(1), draws[1])
    assert [mixture.source_of(i) for i in (0, 9, 10, 15, 16, 23)] == [0, 0, 1, 1, 2, 2]


def test_a_mix_is_set_in_yaml_or_as_a_flow_list_and_checked():
    cfg = load_config(None, ["output_dir=x", "data.mix=[{path: a, weight: 2}, {path: b/, name: bee}]"])
    assert [(m.path, m.weight, m.name) for m in cfg.data.mix] == [("a", 2.0, ""), ("b/", 1.0, "bee")]
    for override, message in (
        ("data.mix=[{path: a}, {path: x/a}]", "named alike"),
        ("data.mix=[{path: a, weight: 0}]", "weight must be > 0"),
        ("data.mix=[{path: a, weight: 1e8}]", r"at most 1000 \(got 1e\+08\).*train.epochs or train.max_steps"),
        ("data.mix=[{path: a, wieght: 2}]", r"unknown key data\.mix\[0\]\.wieght"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["output_dir=x", override])
    with pytest.raises(ConfigError, match="set data.path or data.mix, not both"):
        load_config(None, ["output_dir=x", "data.path=c.json", "data.mix=[{path: a}]"])
    with pytest.raises(ConfigError, match="eval.holdout does not split a data.mix"):
        load_config(None, ["output_dir=x", "data.mix=[{path: a}]", "eval.holdout=10"])
    with pytest.raises(ConfigError, match="give each source its own image_dir"):
        load_config(None, ["output_dir=x", "data.mix=[{path: a}]", "data.image_dir=imgs"])


def test_a_weight_that_draws_nothing_is_refused_naming_the_source(shapes_data):
    records = load_records(shapes_data["val"])  # 32 records
    parts = [LlavaDataset(records, None, ""), LlavaDataset(records, None, "")]
    MixedDataset(parts, ["a", "b"], [1.0, 0.02], seed=0)  # 0.64 of a record rounds to one
    with pytest.raises(UserError, match=r"data.mix source b .* weight 0.01 draws none of its 32 records"):
        MixedDataset(parts, ["a", "b"], [1.0, 0.01], seed=0)


def test_a_mixture_whose_epoch_would_not_fit_in_memory_is_refused_before_training(shapes_data):
    """An epoch's order is held in memory: 32 records drawn 1,000 times are 32,000 samples (768 kB in three int64
    arrays), refused on a host of 1 MB and accepted on one of 2 MB (the control), naming the bytes and the source."""
    from llava_loop.data.mixture import Mixture, check_epoch_fits

    mixture = Mixture([32, 10], [1000.0, 1.0], seed=0)
    check_epoch_fits(mixture, ["big", "small"], 2_000_000)
    with pytest.raises(UserError, match=r"32,010 samples, whose order alone needs 768 kB .*source big draws 1000 x 32"):
        check_epoch_fits(mixture, ["big", "small"], 1_000_000)


def test_a_mix_sources_image_dir_may_move_on_resume_its_records_may_not():
    """As data.image_dir may change on resume (the images moved), so may a mix source's image_dir; its path, its
    weight and the number of sources may not."""
    from llava_loop.checkpoint.files import CheckpointError
    from llava_loop.checkpoint.policy import check_resumable

    def tree(*sources):
        return yaml.safe_load(load_config(None, ["output_dir=x", f"data.mix=[{', '.join(sources)}]"]).to_yaml())

    saved = tree("{path: a, image_dir: /old}", "{path: b}")
    moved = check_resumable(Path("ckpt"), {}, {}, saved, tree("{path: a, image_dir: /new}", "{path: b}"))
    assert moved == ["data.mix[0].image_dir: '/old' -> '/new'"]
    for changed, key in [
        (tree("{path: c, image_dir: /old}", "{path: b}"), "data.mix[0].path"),
        (tree("{path: a, image_dir: /old}", "{path: b, weight: 2}"), "data.mix[1].weight"),
        (tree("{path: a, image_dir: /old}"), "data.mix"),
    ]:
        with pytest.raises(CheckpointError, match=re.escape(key)):
            check_resumable(Path("ckpt"), {}, {}, saved, changed)


def mix(shapes_data, train_weight=0.25) -> dict:
    """32 held-out shapes once per epoch and a quarter of the 96 training ones (24): 56 samples, 14 steps of 4."""
    return {
        "path": "",
        "image_dir": "",
        "eval_path": "",
        "mix": [
            {"path": str(shapes_data["val"]), "image_dir": str(shapes_data["val_images"]), "name": "val"},
            {"path": str(shapes_data["train"]), "image_dir": str(shapes_data["train_images"]), "weight": train_weight},
        ],
    }


def per_source(step: dict) -> dict:
    """The step's samples by source, from their ids (the training source is named after its file, chat.json)."""
    val = sum(i.startswith("val") for i in step["sample_ids"])
    return {"val": val, "chat": len(step["sample_ids"]) - val}


@pytest.mark.slow
def test_a_mixed_run_counts_each_source_and_resumes_bitwise_across_an_epoch(
    tmp_path, run_config, shapes_data, monkeypatch
):
    """Run A: 17 steps straight (into the second epoch); run B stops after step 15 and resumes. Same losses, grad
    norms, learning rates and samples, step for step. Control: another seed draws other samples."""
    n, k = 17, 15
    train = {**helpers.RESUMED_TRAIN, "max_steps": n}
    sections = {"data": mix(shapes_data), "train": train, "hooks": ["plugins:StopAtStep"]}
    monkeypatch.setenv("LLAVA_TEST_STOP_AT", "-1")
    helpers.train_here(run_config("A", **sections))
    monkeypatch.setenv("LLAVA_TEST_STOP_AT", str(k))
    b = run_config("B", **sections)
    helpers.train_here(b)
    monkeypatch.setenv("LLAVA_TEST_STOP_AT", "-1")
    helpers.train_here(b)
    steps_a, steps_b = helpers.steps_by_number(tmp_path / "A"), helpers.steps_by_number(tmp_path / "B")
    assert sorted(steps_b) == list(range(1, n + 1))
    assert helpers.trajectory(steps_a, 1, n) == helpers.trajectory(steps_b, 1, n)
    for step in steps_a.values():  # samples/<name> counts what each step took from each source
        assert {"val": step["samples/val"], "chat": step["samples/chat"]} == per_source(step)
    epoch0 = [i for s in range(1, 15) for i in steps_a[s]["sample_ids"]]
    assert Counter(i.startswith("val") for i in epoch0) == {True: 32, False: 24} and len(set(epoch0)) == 56
    epoch1 = {i for s in range(15, n + 1) for i in steps_a[s]["sample_ids"] if not i.startswith("val")}
    assert epoch1 - set(epoch0)  # the quarter of the training set is drawn afresh in epoch 1
    other = run_config("other", **{**sections, "train": {**train, "seed": 5}})
    helpers.train_here(other)
    assert helpers.trajectory(helpers.steps_by_number(tmp_path / "other"), 1, 3) != helpers.trajectory(steps_a, 1, 3)


@pytest.mark.slow
def test_a_mix_fills_token_budgets_packed(tmp_path, run_config, shapes_data):
    data = {**mix(shapes_data, train_weight=0.5), "max_tokens_per_micro_batch": 360, "padding_free": True}
    helpers.train_here(run_config("run", data=data, train={**helpers.RESUMED_TRAIN, "max_steps": 6}))
    steps = helpers.metrics(tmp_path / "run")
    assert len({len(s["sample_ids"]) for s in steps}) > 1  # the budget, not a fixed size, made the micro-batches
    for step in steps:
        assert {"val": step["samples/val"], "chat": step["samples/chat"]} == per_source(step)
        assert step["samples/val"] + step["samples/chat"] == step["samples"]
