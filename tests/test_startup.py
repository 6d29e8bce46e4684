"""Startup refusals (issue 25): what the config names but this run cannot honour fails before the model loads, as a
UserError naming the fix (exit 2 through the CLI), never as a raw traceback or a run that silently logs nothing."""

from __future__ import annotations

import importlib.util

import pytest

from llava_loop.cli import main
from llava_loop.config import ConfigError, load_config
from llava_loop.errors import UserError

import helpers


def weighted_ce(model, batch, *, weight: float) -> dict:  # a loss with a required keyword
    raise AssertionError("never called: the run must fail at startup")


def prepare_with(cfg, *, where: str) -> None:  # a setup function with a required keyword
    raise AssertionError("never called: the run must fail at startup")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the run gets as far as loading the model."""
    from llava_loop import loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))


def test_an_unknown_tracker_name_is_refused_listing_the_valid_ones(run_config, capsys):
    path = run_config(trackers=["tensorbord"])
    with pytest.raises(
        ConfigError, match=r"trackers: 'tensorbord' is not a tracker; valid trackers: .*tensorboard.*wandb"
    ):
        load_config(path)
    assert main(["train", "--config", str(path)]) == 2
    assert "valid trackers:" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_refused_before_the_model_loads(
    tmp_path, run_config, no_model, fresh_accelerate_state, capsys
):
    path = run_config(trackers=["wandb"])
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trackers: wandb is not installed" in err and "pip install 'llava-loop[trackers]'" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed here")
def test_the_lmms_eval_hook_without_lmms_eval_is_refused_at_construction(
    run_config, no_model, fresh_accelerate_state, capsys
):
    from llava_loop.lmms import LmmsEval

    with pytest.raises(UserError, match=r"needs lmms-eval, which is not installed: pip install 'llava-loop\[lmms\]'"):
        LmmsEval(tasks=["mme"])
    path = run_config(hooks=[{"fn": "llava_loop.lmms:LmmsEval", "kwargs": {"tasks": ["mme"]}}])
    assert main(["train", "--config", str(path)]) == 2
    assert "pip install 'llava-loop[lmms]'" in capsys.readouterr().err


def test_the_lmms_eval_hooks_old_name_is_refused_with_its_new_one(run_config, no_model, fresh_accelerate_state):
    path = run_config(hooks=[{"fn": "llava_loop.hooks:LmmsEval", "kwargs": {"tasks": ["mme"]}}])
    with pytest.raises(
        UserError, match=r"hook 'llava_loop.hooks:LmmsEval' has moved: name it llava_loop.lmms:LmmsEval"
    ):
        helpers.train_here(path)


def test_lmms_options_reach_the_background_job_as_they_were_given():
    """The hook hands its options to ``python -m llava_loop.lmms`` as flags; that job's parser reads back the same."""
    import argparse

    from llava_loop.lmms import LmmsOptions

    given = LmmsOptions(
        ["mme", "llava_loop_heldout"],
        data="val.json",
        image_dir="imgs",
        max_samples=8,
        max_new_tokens=16,
        limit=3,
        device="cuda:7",
        dtype="bfloat16",
    )
    parser = argparse.ArgumentParser()
    LmmsOptions.add_arguments(parser)
    assert LmmsOptions.from_args(parser.parse_args(given.to_argv())) == given
    defaults = LmmsOptions(["pope"])
    assert defaults.to_argv() == ["--tasks", "pope", "--max-new-tokens", "32", "--device", "cpu", "--dtype", "float32"]
    assert LmmsOptions.from_args(parser.parse_args(defaults.to_argv())) == defaults


@pytest.mark.parametrize(
    "section, value, message",
    [
        (
            "hooks",
            ["llava_loop.lmms:LmmsEval"],
            r"hook llava_loop.lmms:LmmsEval: missing a required argument: 'tasks' .*kwargs: \{tasks: \.\.\.\}",
        ),
        (
            "loss",
            "test_startup:weighted_ce",
            r"loss test_startup:weighted_ce: missing a required argument: 'weight' .*kwargs: \{weight: \.\.\.\}",
        ),
        (
            "setup",
            ["test_startup:prepare_with"],
            r"setup test_startup:prepare_with: missing a required argument: 'where' .*kwargs: \{where: \.\.\.\}",
        ),
    ],
)
def test_a_missing_required_kwarg_is_named_like_a_misspelled_one(
    section, value, message, run_config, no_model, fresh_accelerate_state, capsys
):
    path = run_config(**{section: value})
    with pytest.raises(UserError, match=message):
        helpers.train_here(path)
    assert main(["train", "--config", str(path)]) == 2
    assert "missing a required argument" in capsys.readouterr().err
