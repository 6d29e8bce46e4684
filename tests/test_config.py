"""Config tree: every shipped config loads; unknown keys and bad values fail before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_loop.config import MODES, Call, ConfigError, describe_fields, load_config, reference_markdown

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.canonical_mode in MODES


def test_shipped_configs_cover_the_modes_and_recipes():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "stage1_projector.yaml", "lora.yaml", "freeze_vision.yaml", "full.yaml"} <= names
    stage1 = load_config(CONFIGS[0].parent / "stage1_projector.yaml")
    t = stage1.train
    assert stage1.canonical_mode == "projector"
    assert (t.lr, t.epochs, t.warmup_ratio, t.weight_decay) == (1e-3, 1.0, 0.03, 0.0)
    assert t.micro_batch_size * t.grad_accum == 256 // 8  # global batch 256 on 8 GPUs
    stage2 = load_config(CONFIGS[0].parent / "stage2_instruct.yaml")
    t, d = stage2.train, stage2.data
    assert stage2.canonical_mode == "freeze_vision" and d.padding_free and d.max_tokens_per_micro_batch >= d.max_length
    assert (t.lr, t.epochs, t.warmup_ratio, t.weight_decay, d.max_length) == (2e-5, 1.0, 0.03, 0.0, 2048)


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "data.path=/x.json",
            "train.lr=1e-4",
            "train.grad_accum=4",
            "mode=none",
            "hooks=a.b:C,d.e:F",
            "train.gradient_checkpointing=true",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_accum == 4
    assert cfg.canonical_mode == "full"
    assert [h.fn for h in cfg.hooks] == ["a.b:C", "d.e:F"] and not any(h.kwargs for h in cfg.hooks)
    assert cfg.train.gradient_checkpointing is True


def test_an_override_that_is_not_yaml_names_the_key_the_value_and_the_fix():
    for item in ["data.mix=[{path: a.json, weight: 1}", "data.system_prompt=@x"]:
        key, value = item.split("=", 1)
        with pytest.raises(ConfigError) as raised:
            load_config(None, ["data.path=x", item])
        message = str(raised.value)
        assert f"override {key}={value}: the value is not valid YAML" in message and "a string as" in message
    # the fix it gives works
    assert load_config(None, ["data.path=x", 'data.system_prompt="@x"']).data.system_prompt == "@x"


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr.*valid keys under train:.*\blr\b"):
        load_config(None, ["data.path=x", "train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key bogus.*valid keys under the top level:.*output_dir"):
        load_config(None, ["data.path=x", "bogus=1"])


def test_bad_values_name_the_key_and_choices():
    with pytest.raises(ConfigError, match=r"mode: 'adapter' is not one of projector, lora, freeze_vision, full, none"):
        load_config(None, ["data.path=x", "mode=adapter"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: expected an integer"):
        load_config(None, ["data.path=x", "train.micro_batch_size=big"])
    with pytest.raises(ConfigError, match=r"train.grad_accum must be >= 1"):
        load_config(None, ["data.path=x", "train.grad_accum=0"])
    with pytest.raises(ConfigError, match=r"data.path is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train.lr must be a finite number \(got nan\)"):
        load_config(None, ["data.path=x", "train.lr=.nan"])
    with pytest.raises(ConfigError, match=r"train.epochs must be a finite number \(got inf\)"):
        load_config(None, ["data.path=x", "train.epochs=.inf"])
    with pytest.raises(ConfigError, match=r"output_dir is required"):
        load_config(None, ["data.path=x", "output_dir="])
    # each failed only after the model loaded and a step ran: a modulo by zero, a false "0 non-finite steps in a
    # row" abort, a time limit already passed
    for bad, message in (
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be >= 1"),
        ("train.time_limit_minutes=-1", "train.time_limit_minutes must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["data.path=x", bad])


def test_yaml_reads_only_true_and_false_as_booleans(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans, so the documented train.liger=on failed as 'True is not one of
    auto, on, off'; in a file too. Booleans still take true/false, yes/no and on/off."""
    cfg = load_config(None, ["data.path=x", "train.liger=on", "train.compile=yes"])
    assert (cfg.train.liger, cfg.train.compile) == ("on", True)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: x\ntrain:\n  liger: off\n  compile: off\n  log_sample_ids: true\n")
    cfg = load_config(path, [])
    assert (cfg.train.liger, cfg.train.compile, cfg.train.log_sample_ids) == ("off", False, True)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("data: {path: x}\ntrain: {warmup: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key train.warmup"):
        load_config(bad)


def test_every_field_is_documented():
    rows = describe_fields()
    assert rows and all(help_text for *_, help_text in rows)
    keys = {k for k, *_ in rows}
    fixed = {
        "mode",
        "output_dir",
        "resume",
        "loss",
        "hooks",
        "model.path",
        "data.path",
        "data.image_dir",
        "data.num_workers",
        "data.max_length",
        "data.max_skip_fraction",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.max_steps",
        "train.epochs",
        "train.lr",
        "train.projector_lr",
        "train.warmup_ratio",
        "train.weight_decay",
        "train.max_grad_norm",
        "train.gradient_checkpointing",
        "train.seed",
        "checkpoint.every",
        "checkpoint.keep_last",
        "eval.every",
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "lora.targets",
    }
    assert fixed <= keys


def test_a_call_takes_a_string_or_fn_with_kwargs_and_overrides_reach_the_kwargs():
    cfg = load_config(
        None,
        [
            "data.path=x",
            "loss=llava_loop.losses:ce_with_z_loss",
            "loss.kwargs.z_weight=1e-3",
            "setup=[{fn: a.b:c, kwargs: {n: 3}}]",
        ],
    )
    assert cfg.loss == Call("llava_loop.losses:ce_with_z_loss", {"z_weight": 1e-3})
    assert cfg.setup == [Call("a.b:c", {"n": 3})]
    assert load_config(None, ["data.path=x"]).loss == Call("llava_loop.losses:label_only_ce", {})
    with pytest.raises(ConfigError, match=r"unknown key loss.kwarg\b"):
        load_config(None, ["data.path=x", "loss.kwarg.z=1"])
    with pytest.raises(ConfigError, match=r"'nocolon': expected module:attribute"):
        load_config(None, ["data.path=x", "setup=[nocolon]"])
    with pytest.raises(ConfigError, match=r"loss: name the function too, e.g. loss.fn="):
        load_config(None, ["data.path=x", "loss.kwargs.z_weight=1e-3"])


def test_resume_may_change_cadence_and_schedule_but_not_what_trains_on_what():
    from llava_loop.config import change_line, config_differences

    saved = load_config(None, ["data.path=x"]).to_dict()
    changed = load_config(
        None,
        [
            "data.path=x",
            "train.max_steps=9",
            "eval.every=5",
            "hooks=a:B",
            "eval.holdout=10",
            "data.eval_path=y.json",
            "train.weight_decay=0.1",
            "lora.r=8",
        ],
    ).to_dict()
    differences = config_differences(saved, changed)
    applied = [change_line(key, old, new) for key, old, new, may_change in differences if may_change]
    refused = [change_line(key, old, new) for key, old, new, may_change in differences if not may_change]
    assert [line.split(":")[0] for line in applied] == ["eval.every", "hooks", "train.max_steps"]
    assert [line.split(":")[0] for line in refused] == [
        "data.eval_path",
        "eval.holdout",
        "lora.r",
        "train.weight_decay",
    ]


def test_the_modes_table_covers_exactly_the_config_modes():
    from llava_loop.modes import TRAINABLE_PARTS

    assert tuple(TRAINABLE_PARTS) == MODES


def test_docs_config_reference_is_current():
    """docs/CONFIG.md is generated from the dataclasses (`python -m llava_loop.config > docs/CONFIG.md`)."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    assert doc.read_text() == reference_markdown()
    for key, *_ in describe_fields():
        assert f"`{key}`" in doc.read_text()
    rows = {
        line.split(" | ")[0].strip("| `"): line.split(" | ")[2]
        for line in doc.read_text().splitlines()
        if line.startswith("| `")
    }
    assert rows["train.lr"] == "may change" and rows["train.seed"] == "kept"  # the column says what policy enforces


def test_shipped_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the copy installed with the package is used
    assert load_config("configs/demo.yaml").output_dir == "runs/demo"
    with pytest.raises(ConfigError, match=r"config file configs/nope.yaml not found"):
        load_config("configs/nope.yaml")
