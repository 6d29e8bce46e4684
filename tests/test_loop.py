"""The training loop: modes, losses, accumulation parity, non-finite skips, hooks, launch paths."""

from __future__ import annotations

import json
import math
import os
import random
import sys

import pytest
import torch

from llava_loop.config import MODES, LoraConfig, load_config
from llava_loop.data.collate import Collator
from llava_loop.loaders import make_datasets
from llava_loop.losses import full_logits_ce, label_only_ce
from llava_loop.modes import apply_mode, lora_target_regex, param_groups
from llava_loop.parts import PROJECTOR, VISION, base_llava, count_params, part_of

import helpers


def _model(tiny_model_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)


def _processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _batch(run_config, tiny_processor, n=4):
    cfg = load_config(run_config())
    train, _ = make_datasets(cfg, tiny_processor)
    return Collator(tiny_processor.tokenizer.pad_token_id)([train[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_label_only_loss_equals_full_logit_cross_entropy(run_config, tiny_model_dir, tiny_processor):
    batch = _batch(run_config, tiny_processor)
    model = _model(tiny_model_dir).eval()
    with torch.no_grad():
        label_only = label_only_ce(model, batch)["loss"]
        full = full_logits_ce(model, batch)["loss"]
    assert torch.isclose(label_only, full, rtol=1e-5), (label_only, full)
    # and the gradients agree
    grads = []
    for fn in (label_only_ce, full_logits_ce):
        model.zero_grad()
        fn(model, batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.linalg.norm(grads[0] - grads[1]) / torch.linalg.norm(grads[1]) < 1e-5


def test_chunked_loss_is_exact_and_recomputes_each_chunk_in_backward(run_config, tiny_model_dir, tiny_processor):
    """label_only_ce in chunks of 7 supervised rows equals the one-chunk loss and gradients to 1e-6; each chunk's
    LM head runs once forward and once more in backward (its logits were not kept); one chunk recomputes nothing."""
    batch = _batch(run_config, tiny_processor)
    rows = batch["n_label_tokens"]
    assert rows > 3 * 7
    model = _model(tiny_model_dir)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    results = {}
    for chunk_rows in (7, 10**6):
        model.zero_grad()
        head_calls.clear()
        loss = label_only_ce(model, batch, chunk_rows=chunk_rows)["loss"]
        forward_calls = len(head_calls)
        loss.backward()
        results[chunk_rows] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            forward_calls,
            len(head_calls),
        )
    chunked, whole = results[7], results[10**6]
    assert torch.isclose(chunked[0], whole[0], rtol=1e-6, atol=0), (chunked[0], whole[0])
    assert chunked[1].keys() == whole[1].keys() and len(whole[1]) > 10  # full mode: the head trains too
    flat = [torch.cat([grads[n].flatten() for n in sorted(whole[1])]) for grads in (chunked[1], whole[1])]
    assert torch.linalg.norm(flat[0] - flat[1]) <= 1e-6 * torch.linalg.norm(flat[1])  # float reassociation only
    chunks = math.ceil(rows / 7)
    assert chunked[2:] == (chunks, 2 * chunks) and whole[2:] == (1, 1)
    # negative control: the tolerance tells a changed target apart
    wrong = dict(batch, supervised=batch["supervised"].clone())
    wrong["supervised"][2, 0] = (wrong["supervised"][2, 0] + 1) % model.config.text_config.vocab_size
    with torch.no_grad():
        assert not torch.isclose(label_only_ce(model, wrong, chunk_rows=7)["loss"], whole[0], rtol=1e-6, atol=0)


def _host_syncs(fn) -> int:
    """Operators that make the host wait for a device result (a boolean mask's nonzero, a scalar read), counted
    by the profiler in one call of ``fn`` (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::nonzero", "aten::_local_scalar_dense"))


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_loss_adds_no_host_read_to_the_models_own(padding_free, tmp_path, tiny_processor, tiny_model_dir):
    """With the collator's supervised index and sample boundaries, the default loss (forward + backward) makes no
    host read beyond those the model's own forward and backward make (Llava's placeholder check, the packed-row
    detection).
    Negative controls: the same batch without the index reads once more (its label mask), and a packed batch
    without the boundaries once more per attention layer (read from position_ids)."""
    from llava_loop.losses import model_inputs

    samples = _mixed_samples(tmp_path, tiny_processor)
    batch = Collator(tiny_processor.tokenizer.pad_token_id, padding_free=padding_free)(samples)
    from llava_loop.runtime import load_model

    model = load_model(tiny_model_dir, packed=padding_free)[0]  # packed: the LLM runs sdpa_varlen
    own = _host_syncs(lambda: model(**model_inputs(batch), logits_to_keep=1, use_cache=False).logits.sum().backward())
    assert _host_syncs(lambda: label_only_ce(model, batch)["loss"].backward()) == own
    unindexed = {k: v for k, v in batch.items() if k != "supervised"}
    assert _host_syncs(lambda: label_only_ce(model, unindexed)["loss"].backward()) == own + 1
    if padding_free:
        unbounded = {k: v for k, v in batch.items() if k not in ("sample_bounds", "cu_seq_lens")}
        layers = model.config.text_config.num_hidden_layers
        assert _host_syncs(lambda: label_only_ce(model, unbounded)["loss"].backward()) == own + layers


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_exactly_its_parameters(mode, tiny_model_dir):
    model = apply_mode(_model(tiny_model_dir), mode, LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    every = {n for n, _ in model.named_parameters()}
    projector = {n for n in every if part_of(n) == PROJECTOR and "original_module" not in n}
    vision = {n for n in every if part_of(n) == VISION}
    # feature layer -2 of 3: layer 2 and post_layernorm never reach the loss
    unused = {n for n in vision if ".encoder.layers.2." in n or ".post_layernorm." in n}
    assert unused and len(unused) < len(vision)
    llm = every - vision - {n for n in every if part_of(n) == PROJECTOR}
    if mode == "projector":
        assert trainable == projector
    elif mode == "lora":
        lora = {n for n in trainable if ".lora_" in n}
        assert trainable == projector | lora
        assert lora and all(".language_model." in n for n in lora)
        assert not any("lora" in n for n in vision)  # CLIP's q/k/v_proj got no adapters
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
        assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    elif mode == "freeze_vision":
        assert trainable == projector | llm
    else:
        assert trainable == projector | llm | (vision - unused)


def test_vision_layers_after_the_feature_layer_are_not_computed(tiny_model_dir):
    """The tiny tower has 3 layers and reads layer -2: the last layer runs as the identity, and the features the
    projector gets are bitwise those of the untouched model (whose last layer does run)."""
    from transformers import LlavaForConditionalGeneration

    reference = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    model = apply_mode(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), "full")
    last = model.model.vision_tower.encoder.layers[-1]

    def never(*args, **kwargs):
        raise AssertionError("a skipped layer ran")

    last.mlp.forward = never
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.model.get_image_features(pixel_values=pixels).pooler_output
        got = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    reference.model.vision_tower.encoder.layers[-1].mlp.forward = never  # negative control: unpatched, it runs
    with pytest.raises(AssertionError, match="a skipped layer ran"), torch.no_grad():
        reference.model.get_image_features(pixel_values=pixels)
    assert "model.vision_tower.encoder.layers.2.mlp.fc1.weight" in model.state_dict()  # still saved and exported


def test_lora_targets_are_the_language_models_linear_layers(tiny_model_dir):
    import re

    from transformers import LlavaForConditionalGeneration

    from llava_loop.errors import UserError

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    regex = re.compile(lora_target_regex(model, ["all-linear"]))
    matched = {name for name, _ in model.named_modules() if regex.match(name)}
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert matched == {name for name in linear if ".language_model." in f".{name}"}  # found by type, LLM only
    assert len(matched) == 2 * 7 and "lm_head" not in matched
    assert any(".vision_tower." in name and name.endswith("q_proj") for name in linear)  # CLIP's q_proj is left out
    regex = re.compile(lora_target_regex(model, ["q_proj", "down_proj"]))
    assert regex.match("base_model.model.model.language_model.layers.1.mlp.down_proj")
    assert not regex.match("model.language_model.layers.0.self_attn.q_proj_extra")
    with pytest.raises(UserError, match=r"lora.targets: \['c_attn'\] are not linear layers.*'down_proj'"):
        lora_target_regex(model, ["c_attn", "q_proj"])


def test_real_scale_trainable_counts_on_meta_device():
    from transformers import LlavaForConditionalGeneration

    config = helpers.clip_l_qwen25_3b_config()
    projector = 1024 * 2048 + 2048 + 2048 * 2048 + 2048
    llm = 3_085_938_688  # Qwen2.5-3B with tied embeddings
    vision_layer = 4 * (1024 * 1024 + 1024) + 2 * (1024 * 4096) + 4096 + 1024 + 4 * 1024
    vision_used = 303_507_456 - vision_layer - 2 * 1024  # layer 23 and post_layernorm are unused
    r = 16
    lora_per_layer = r * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 11008) * 3)
    expected = {
        "projector": projector,
        "freeze_vision": projector + llm,
        "full": projector + llm + vision_used,
        "lora": projector + 36 * lora_per_layer,
    }
    for mode, count in expected.items():
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        model = apply_mode(model, mode, LoraConfig(r=r, alpha=32, dropout=0.0))
        trainable = count_params(model, trainable_only=True)
        assert sum(trainable.values()) == count, mode


def test_param_groups_skip_decay_on_biases_and_norms_and_set_projector_lr(tiny_model_dir):
    model = apply_mode(_model(tiny_model_dir), "full")
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, projector_lr=1e-3, weight_decay=0.1)}
    assert set(groups) == {"model/decay", "model/no_decay", "projector/decay", "projector/no_decay"}
    assert groups["projector/decay"]["lr"] == groups["projector/no_decay"]["lr"] == 1e-3
    assert groups["model/decay"]["lr"] == 1e-4
    assert all(p.ndim == 1 for p in groups["model/no_decay"]["params"])  # biases, norms
    assert groups["model/no_decay"]["weight_decay"] == 0.0 and groups["model/decay"]["weight_decay"] == 0.1
    named = {id(p): n for n, p in model.named_parameters()}
    assert any(named[id(p)].endswith("norm.weight") for p in groups["model/no_decay"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_gives_the_same_gradients(mode, run_config, tiny_model_dir, tiny_processor):
    batch = _batch(run_config, tiny_processor)
    grads = {}
    for checkpointing in (False, True):
        model = apply_mode(
            _model(tiny_model_dir), mode, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=checkpointing
        )
        model.train()
        torch.manual_seed(0)
        label_only_ce(model, batch)["loss"].backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads[checkpointing].values()), "a trainable tensor got no gradient"
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        assert torch.allclose(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7), name


def _probe_vision_layer(model):
    """Counts runs of the vision tower's first encoder layer, recomputes included (transformers checkpoints the
    layer's ``forward``, so the probe sits on its first sub-module, as a pre-hook because a recompute may stop
    early), and records whether the layer's output carried an autograd graph."""
    llava = base_llava(model)
    probe = {"calls": 0, "graph": []}
    layer = llava.model.vision_tower.encoder.layers[0]
    layer.layer_norm1.register_forward_pre_hook(lambda module, args: probe.update(calls=probe["calls"] + 1))
    layer.register_forward_hook(
        lambda module, args, out: probe["graph"].append((out[0] if isinstance(out, tuple) else out).requires_grad)
    )
    return probe


@pytest.mark.parametrize("mode", ["projector", "lora", "freeze_vision", "full"])
def test_checkpointing_never_recomputes_or_backpropagates_a_frozen_vision_tower(
    mode, run_config, tiny_model_dir, tiny_processor
):
    batch = _batch(run_config, tiny_processor)
    model = apply_mode(_model(tiny_model_dir), mode, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    model.train()
    probe = _probe_vision_layer(model)
    label_only_ce(model, batch)["loss"].backward()
    llava = model.get_base_model() if mode == "lora" else model
    assert llava.model.language_model.layers[0].gradient_checkpointing  # the LLM is checkpointed in every mode
    if mode == "full":  # the tower trains: checkpointed, so recomputed once in backward
        assert probe["calls"] == 2 and probe["graph"][0]
    else:
        assert probe == {"calls": 1, "graph": [False]}, probe  # one forward per micro-batch, no autograd graph
        assert not llava.model.vision_tower.encoder.layers[0].gradient_checkpointing
    if mode == "projector":  # negative control: checkpointing the whole model with input-grad hooks (the old way)
        old = apply_mode(_model(tiny_model_dir), mode)
        old.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        old.enable_input_require_grads()
        old.train()
        old_probe = _probe_vision_layer(old)
        label_only_ce(old, batch)["loss"].backward()
        assert (
            old_probe["calls"] == 2 and old_probe["graph"][0]
        )  # recomputed and backpropagated: what the probe catches


# ---------------------------------------------------------------------------------------------
# Padding-free packing
# ---------------------------------------------------------------------------------------------


def _mixed_samples(tmp_path, processor):
    """Text-only, one-image, two-image and multi-turn records of different lengths, as stage-2 data mixes them."""
    from PIL import Image

    from llava_loop.data.dataset import LlavaDataset
    from llava_loop.data.encode import SampleEncoder
    from llava_loop.data.records import Record, Records

    for name, rgb in {"r.png": (220, 30, 30), "b.png": (30, 30, 220), "g.png": (30, 200, 30)}.items():
        Image.new("RGB", (64, 64), rgb).save(tmp_path / name)
    records = [
        Record("txt", (), (("user", "Say hi."), ("assistant", "hi ."))),
        Record("one", ("g.png",), (("user", "<image>\nDescribe."), ("assistant", "a green circle in the center ."))),
        Record(
            "two",
            ("r.png", "b.png"),
            (("user", "First:\n<image>\nSecond:\n<image>\nWhich is red?"), ("assistant", "the first .")),
        ),
        Record(
            "long",
            (),
            (
                ("user", "Count: " + "one two three " * 6),
                ("assistant", "three ."),
                ("user", "Again?"),
                ("assistant", "yes, three ."),
            ),
        ),
        Record(
            "turns",
            ("b.png",),
            (("user", "<image>\nColour?"), ("assistant", "blue ."), ("user", "Shape?"), ("assistant", "square .")),
        ),
    ]
    dataset = LlavaDataset(Records.from_records(records), SampleEncoder(processor, max_length=512), tmp_path)
    return [dataset[i] for i in range(len(records))]


def _token_losses_and_grads(tiny_model_dir, mode, batch, kernel="auto"):
    import torch.nn.functional as F

    from llava_loop.losses import supervised_logits
    from llava_loop.runtime import load_model

    torch.manual_seed(0)  # the same LoRA initialisation for every layout
    model = load_model(tiny_model_dir, attn_implementation=kernel)[0]
    assert model.config.text_config._attn_implementation == ("sdpa" if kernel == "auto" else kernel)
    model = apply_mode(model, mode, LoraConfig(r=4, alpha=8, dropout=0.0))
    logits, targets = supervised_logits(model, batch)
    losses = F.cross_entropy(logits, targets, reduction="none")
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel", ["sdpa", "sdpa_varlen"])  # dense block-diagonal mask; sdpa per packed sample
@pytest.mark.parametrize("mode", MODES)
def test_padding_free_packing_gives_the_padded_losses_and_gradients(
    mode, kernel, tmp_path, tiny_model_dir, tiny_processor
):
    samples = _mixed_samples(tmp_path, tiny_processor)
    pad = tiny_processor.tokenizer.pad_token_id
    padded, packed = Collator(pad)(samples), Collator(pad, padding_free=True)(samples)
    assert packed["input_ids"].shape == (1, packed["n_tokens"]) and packed["n_slots"] == packed["n_tokens"]
    assert padded["n_slots"] > padded["n_tokens"] == packed["n_tokens"]
    assert packed["n_label_tokens"] == padded["n_label_tokens"]
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])  # 1 + 2 + 1 images, in sample order

    reference, reference_grads = _token_losses_and_grads(tiny_model_dir, mode, padded)
    # the collator's sample boundaries (read once per batch), and a caller's packed row without them (each layer
    # finds them in position_ids)
    unbounded = {k: v for k, v in packed.items() if k not in ("sample_bounds", "cu_seq_lens")}
    for batch in (packed, unbounded):
        losses, grads = _token_losses_and_grads(tiny_model_dir, mode, batch, kernel)
        assert (
            losses.shape == reference.shape and (losses - reference).abs().max() < 1e-5
        )  # every token of every sample
        assert grads.keys() == reference_grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            assert (grad - reference_grads[name]).abs().max() < 1e-5, name

    # negative controls: positions running on across samples, or attention across samples, change the losses
    running = dict(unbounded, position_ids=torch.arange(packed["n_tokens"])[None])
    assert (_token_losses_and_grads(tiny_model_dir, mode, running, kernel)[0] - reference).abs().max() > 1e-3
    if kernel == "sdpa":  # an all-ones mask turns transformers' packed-sequence detection off
        crossing = dict(packed, attention_mask=torch.ones(1, packed["n_tokens"], dtype=torch.long))
    else:  # the kernel, given one sample for the whole row, attends across the samples (positions still restart)
        whole = [0, packed["n_tokens"]]
        crossing = dict(packed, sample_bounds=whole, cu_seq_lens=torch.tensor(whole, dtype=torch.int32))
    assert (_token_losses_and_grads(tiny_model_dir, mode, crossing, kernel)[0] - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Runs (in process)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_held_out_loss_decreases_in_every_mode(mode, run_config, fresh_accelerate_state):
    from llava_loop.loop import Trainer

    cfg = load_config(
        run_config(
            mode=mode,
            train={"max_steps": 12, "lr": 3e-3 if mode != "full" else 1e-3},
            eval={"every": 12},
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
        )
    )
    Trainer(cfg).fit()
    evals = helpers.metrics(cfg.output_dir, "eval")
    assert [m["step"] for m in evals] == [0, 12]
    before, after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert after < before - 0.1, (mode, before, after)


def test_custom_loss_terms_and_user_hooks(run_config, fresh_accelerate_state):
    from llava_loop.loop import train

    cfg = load_config(
        run_config(
            loss={"fn": "llava_loop.losses:ce_with_z_loss", "kwargs": {"z_weight": 0.01}},
            hooks=["plugins:RecordCalls"],
            train={"max_steps": 4},
            eval={"every": 2},
            checkpoint={"every": 2, "keep_last": 0},
        )
    )
    train(cfg)
    steps = helpers.metrics(cfg.output_dir)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:  # every named term is logged, normalised by supervised tokens like the loss
        assert m["loss"] == pytest.approx(m["ce"] + 0.01 * m["z_loss"], rel=1e-6)  # the configured z_weight
        assert m["loss"] != pytest.approx(m["ce"] + 1e-4 * m["z_loss"], rel=1e-6)  # not the default
        assert m["z_loss"] > 0
    calls = [json.loads(line) for line in open(f"{cfg.output_dir}/hook_calls.jsonl")]
    events = [(c["event"], c["step"]) for c in calls]
    # each save comes before the evaluation of its step: an evaluation never costs training
    assert events == [
        ("on_train_start", 0),
        ("on_eval", 0),
        ("on_step_end", 1),
        ("on_step_end", 2),
        ("on_save", 2),
        ("on_eval", 2),
        ("on_step_end", 3),
        ("on_step_end", 4),
        ("on_save", 4),
        ("on_eval", 4),
        ("on_train_end", 4),
    ]


def test_non_finite_step_is_skipped_leaving_weights_and_optimizer_untouched(run_config, fresh_accelerate_state):
    from llava_loop.loop import Trainer

    cfg = load_config(
        run_config(
            loss={"fn": "plugins:nan_on_poisoned_steps", "kwargs": {"steps": [3]}},
            hooks=["plugins:Snapshots"],
            train={"max_steps": 5, "warmup_ratio": 0.5},
        )
    )
    trainer = Trainer(cfg)
    trainer.fit()
    logged = {m["step"]: m for m in helpers.metrics(cfg.output_dir)}
    assert not logged[3]["stepped"] and math.isnan(logged[3]["loss"])
    assert all(logged[s]["stepped"] for s in (1, 2, 4, 5))
    assert trainer.state.skipped_steps == 1
    before, after = trainer.snapshots[2], trainer.snapshots[3]
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert all(torch.equal(a, b) for a, b in zip(before["moments"], after["moments"]))
    assert before["lr"] == after["lr"]  # the schedule did not advance either
    assert not all(torch.equal(a, b) for a, b in zip(after["params"], trainer.snapshots[4]["params"]))


def test_run_aborts_after_too_many_non_finite_steps_in_a_row(run_config, fresh_accelerate_state):
    from llava_loop.loop import NonFiniteError, train

    cfg = load_config(
        run_config(
            loss={"fn": "plugins:nan_on_poisoned_steps", "kwargs": {"steps": [2, 3, 4, 5]}},
            train={"max_steps": 8, "max_consecutive_skips": 3},
        )
    )
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row.*max_consecutive_skips=3"):
        train(cfg)


def _read_counter(monkeypatch):
    """Counts host reads (Tensor.item / tolist / __float__) made by llava_loop and Accelerate. torch's AdamW
    reads its step counter, which it keeps on the host, and transformers' Llava formats a tensor into an error
    message on every forward (docs/BENCHMARKS.md); neither is the loop's to remove."""
    reads = []

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(("llava_loop", "accelerate", "plugins")):
                reads.append((name, caller))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("item", "tolist", "__float__"):
        wrap(name)
    return reads


class _ReadsPerStep:
    def __init__(self, reads):
        self.reads, self.at_step_end = reads, []

    def on_step_end(self, trainer, metrics):
        self.at_step_end.append(len(self.reads))


@pytest.mark.parametrize("accum", [1, 4])
def test_at_most_three_host_reads_per_optimizer_step(accum, run_config, monkeypatch, fresh_accelerate_state):
    from llava_loop.loop import Trainer

    reads = _read_counter(monkeypatch)
    per_step = {}
    for loss in ("llava_loop.losses:label_only_ce", "plugins:label_only_ce_read_each_micro_batch"):
        cfg = load_config(
            run_config(
                loss.split(":")[1], loss=loss, train={"micro_batch_size": 2, "grad_accum": accum, "max_steps": 4}
            )
        )
        trainer = Trainer(cfg)
        probe = _ReadsPerStep(reads)
        trainer.hooks.hooks.append(probe)
        trainer.fit()
        per_step[loss] = [b - a for a, b in zip(probe.at_step_end, probe.at_step_end[1:])]
        helpers.reset_accelerate_state()  # two Trainers in one test
    assert len(per_step["llava_loop.losses:label_only_ce"]) == 3
    assert max(per_step["llava_loop.losses:label_only_ce"]) <= 3, reads[-12:]
    # negative control: a loss that reads its value back on every micro-batch is counted once per micro-batch more
    assert [
        b - a
        for a, b in zip(
            per_step["llava_loop.losses:label_only_ce"], per_step["plugins:label_only_ce_read_each_micro_batch"]
        )
    ] == [accum] * 3


# ---------------------------------------------------------------------------------------------
# Launch paths and accumulation parity (real entry points, fresh processes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_config_runs_through_all_three_launch_paths(tmp_path):
    """python train.py, and accelerate launch with the repo's DeepSpeed ZeRO-2 config on 2 processes (1 process
    under DeepSpeed was a third launch that no other path depends on: dropped for CI time)."""
    demo = helpers.ROOT / "configs" / "demo.yaml"
    common = [
        f"model.path={tmp_path / 'tiny'}",
        f"data.path={tmp_path / 'data/train/chat.json'}",
        f"data.image_dir={tmp_path / 'data/train/images'}",
        f"data.eval_path={tmp_path / 'data/val/chat.json'}",
        f"data.eval_image_dir={tmp_path / 'data/val/images'}",
        "setup=[{fn: llava_loop.demo.fixtures:prepare, kwargs: {preset: tiny, samples: 160}}]",
        "train.max_steps=3",
        "eval.every=0",
        "data.num_workers=0",
    ]
    runs = {"python": 0, "deepspeed-2": 2}
    for name, processes in runs.items():
        out = helpers.launch(demo, *common, f"output_dir={tmp_path / name}", processes=processes)
        logged = helpers.metrics(tmp_path / name)
        assert [m["step"] for m in logged] == [1, 2, 3]
        assert all(math.isfinite(m["loss"]) for m in logged)
        expected = "DeepSpeed ZeRO-2" if processes else "DistributedType.NO"
        assert expected in out.stderr and f"x processes {max(processes, 1)} " in out.stderr
        assert (tmp_path / name / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    # the demo built its own tiny model and data on the first run
    assert (tmp_path / "tiny" / "config.json").is_file()


@pytest.mark.slow
def test_accumulation_and_process_layouts_give_the_same_losses_and_gradients(
    tmp_path, run_config, tiny_model_dir, shapes_data
):
    """1 process x mb4 x acc1, 1 process x mb2 x acc2, and 2 DeepSpeed ZeRO-2 processes x mb1 x acc2.
    Multi-turn records give samples different numbers of supervised tokens, so normalisation matters."""
    from llava_loop.demo.shapes import write_shapes

    data = dict(
        shapes_data,
        train=write_shapes(tmp_path / "mt", 48, seed=6, size=64, max_turns=3),
        train_images=tmp_path / "mt" / "images",
    )
    layouts = {"1x4x1": (0, 4, 1), "1x2x2": (0, 2, 2), "2x1x2": (2, 1, 2)}
    losses, grads = {}, {}
    for name, (processes, micro, accum) in layouts.items():
        config = run_config(
            name,
            shapes=data,
            hooks=["plugins:GradCapture"],
            train={
                "micro_batch_size": micro,
                "grad_accum": accum,
                "max_steps": 3,
                "max_grad_norm": 0.0,
                "warmup_ratio": 0.0,
            },
        )
        helpers.launch(config, processes=processes)
        losses[name] = [m["loss"] for m in helpers.metrics(tmp_path / name)]
        grads[name] = torch.load(tmp_path / name / "grads_step1.pt")
    reference = losses["1x4x1"]
    for name in layouts:
        assert len(losses[name]) == 3
        for a, b in zip(losses[name], reference):
            assert abs(a - b) <= 1e-5 * abs(b), (name, losses[name], reference)
        assert grads[name]["names"] == grads["1x4x1"]["names"]
        diff = torch.linalg.norm(grads[name]["flat"] - grads["1x4x1"]["flat"]) / torch.linalg.norm(
            grads["1x4x1"]["flat"]
        )
        assert diff < 1e-5, (name, float(diff))
    # negative control: the common bug, averaging per-micro-batch means, gives a gradient far outside that tolerance
    from llava_loop.data.sampler import EpochSampler

    cfg = load_config(tmp_path / "1x2x2.yaml")
    train_set, _ = make_datasets(cfg, _processor(tiny_model_dir))
    first = EpochSampler(len(train_set), seed=cfg.train.seed).order(0)[:4]
    collate = Collator(train_set.encoder.tokenizer.pad_token_id)
    model = _model(tiny_model_dir)
    counts = []
    for pair in (first[:2], first[2:]):
        batch = collate([train_set[int(i)] for i in pair])
        counts.append(int((batch["labels"][:, 1:] != -100).sum()))
        (label_only_ce(model, batch)["loss"] / counts[-1] / 2).backward()
    assert counts[0] != counts[1]  # the micro-batches carry different numbers of supervised tokens
    params = dict(model.named_parameters())
    mean_of_means = torch.cat([params[n].grad.double().flatten() for n in grads["1x4x1"]["names"]])
    reference_grad = grads["1x4x1"]["flat"]
    assert torch.linalg.norm(mean_of_means - reference_grad) / torch.linalg.norm(reference_grad) > 1e-3


# the train section of runs whose logged losses are compared across process layouts: no clipping or warmup to set
# them apart, and the sample ids each step took
COMPARED_TRAIN = {"max_steps": 4, "max_grad_norm": 0.0, "warmup_ratio": 0.0, "log_sample_ids": True}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["projector", "lora"])  # the projector alone; the projector beside PEFT's adapters
def test_text_only_micro_batches_under_two_process_zero2_match_one_process(mode, tmp_path, run_config, shapes_data):
    """A rank whose micro-batch has no image must still produce projector gradients, or ZeRO-2's reduce breaks
    (gloo: a size mismatch; NCCL: a hang). 2 processes x mb1 x acc2 against 1 process x mb4."""
    data = helpers.mixed_text_and_image_data(tmp_path / "mixed", shapes_data)
    losses = {}
    for name, (processes, micro, accum) in {"1x4x1": (0, 4, 1), "2x1x2": (2, 1, 2)}.items():
        config = run_config(
            name,
            shapes=data,
            mode=mode,
            lora={"r": 4, "alpha": 8, "dropout": 0.0},
            train={**COMPARED_TRAIN, "micro_batch_size": micro, "grad_accum": accum},
        )
        helpers.launch(config, processes=processes)
        losses[name] = helpers.metrics(tmp_path / name)
    # the run really mixed: some accumulation slot had an image on one rank and none on the other
    assert helpers.mixed_slots(losses["2x1x2"]), [m["sample_ids"] for m in losses["2x1x2"]]
    reference = [m["loss"] for m in losses["1x4x1"]]
    got = [m["loss"] for m in losses["2x1x2"]]
    assert len(got) == 4 and got == pytest.approx(reference, rel=1e-5)


def _stage2_mix(root, shapes_data, n=48):
    """Text-only, single-image (some multi-turn) and two-image records, shuffled together."""
    from llava_loop.demo.shapes import write_shapes

    data = helpers.mixed_text_and_image_data(root, shapes_data, n)
    pairs = json.loads(
        write_shapes(root, n // 4, seed=8, size=64, pair_ratio=1.0, prefix="pair", json_name="pairs.json").read_text()
    )  # images beside the others
    records = json.loads(data["train"].read_text()) + pairs
    random.Random(0).shuffle(records)
    data["train"].write_text(json.dumps(records))
    return data


@pytest.mark.slow
def test_padding_free_runs_match_padded_ones_in_one_and_two_process_zero2(tmp_path, run_config, shapes_data):
    """On a stage-2 mix, padded 1 process x mb4, padding-free 1 process x mb4 and padding-free 2-process ZeRO-2
    x mb1 x acc2 log the same losses; padding-free spends no slot on padding."""
    data = _stage2_mix(tmp_path / "mixed", shapes_data)
    runs = {}
    for name, (processes, micro, accum, packed) in {
        "padded": (0, 4, 1, False),
        "packed": (0, 4, 1, True),
        "packed-2x1x2": (2, 1, 2, True),
    }.items():
        config = run_config(
            name,
            shapes=data,
            mode="freeze_vision",
            train={**COMPARED_TRAIN, "micro_batch_size": micro, "grad_accum": accum},
        )
        helpers.launch(config, f"data.padding_free={str(packed).lower()}", "data.max_length=512", processes=processes)
        runs[name] = helpers.metrics(tmp_path / name)
    ids = [i for m in runs["padded"] for i in m["sample_ids"]]
    assert any(i.startswith("pair_") for i in ids) and any(i.startswith("text_") for i in ids)
    reference = [m["loss"] for m in runs["padded"]]
    for name in ("packed", "packed-2x1x2"):
        assert [m["loss"] for m in runs[name]] == pytest.approx(reference, rel=1e-5), name
    assert all(m["pad_fraction"] == 0 for m in runs["packed"]) and any(m["pad_fraction"] > 0 for m in runs["padded"])


@pytest.mark.slow
def test_token_budget_batches_under_two_process_zero2_match_one_process(tmp_path, run_config, shapes_data):
    """Packed micro-batches filled to a token budget: 2 processes x acc 1 run the micro-batches 1 process x acc 2
    runs, as many on each rank, and log the same losses; the samples per step vary."""
    data = _stage2_mix(tmp_path / "mixed", shapes_data)
    budget = {"padding_free": True, "max_length": 512, "max_tokens_per_micro_batch": 600}
    helpers.check_token_budgets_match(run_config, tmp_path, model=None, shapes=data, train=COMPARED_TRAIN, data=budget)


def test_each_epoch_trains_in_its_own_order(tmp_path, run_config, fresh_accelerate_state):
    """Epoch 1 follows the sampler's epoch-1 order, not epoch 0's again (Accelerate's loader counts an epoch only
    when iterated to its end, which the loop never does, and hands the sampler that count)."""
    from llava_loop.loop import Trainer

    config = run_config(
        mode="projector", train={"max_steps": 0, "epochs": 2, "micro_batch_size": 16, "log_sample_ids": True}
    )
    trainer = Trainer(load_config(config, []))
    trainer.fit()
    records = trainer.train_set.records
    trained = [m["sample_ids"] for m in helpers.metrics(tmp_path / "run")]
    expected = [
        [records[i].id for i in trainer.sampler.order(epoch)[k : k + 16]] for epoch in (0, 1) for k in range(0, 96, 16)
    ]
    assert trained[:6] != trained[6:]
    assert trained == expected


def test_token_budget_epochs_each_count_their_own_steps(tmp_path, run_config, shapes_data, fresh_accelerate_state):
    """Under a token budget each epoch's order cuts its own number of micro-batches: two epochs train the sum of
    the two counts (not twice the first), every micro-batch of the second epoch included."""
    from llava_loop.loop import Trainer

    data = _stage2_mix(tmp_path / "mixed", shapes_data)
    config = run_config(shapes=data, mode="projector", train={"max_steps": 0, "epochs": 2, "log_sample_ids": True})
    trainer = Trainer(
        load_config(config, ["data.padding_free=true", "data.max_length=512", "data.max_tokens_per_micro_batch=1200"])
    )
    per_epoch = [trainer.steps_in_epoch(epoch) for epoch in (0, 1)]
    assert per_epoch[0] != per_epoch[1]  # else twice the first epoch's count would pass too
    assert trainer.total_steps == sum(per_epoch)
    trainer.fit()
    rows = helpers.metrics(tmp_path / "run")
    assert len(rows) == sum(per_epoch)
    records = trainer.train_set.records
    second = sorted(records[i].id for batch in trainer.sampler.batches(1) for i in batch)
    assert sorted(i for m in rows[per_epoch[0] :] for i in m["sample_ids"]) == second


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_two_process_run(tmp_path, run_config):
    """The guide's multi-node recipe (docs/guide/training.md): machine_rank 0 and 1 on 127.0.0.1, one process each,
    DeepSpeed ZeRO-2."""
    runs = {}
    for name in ("two-nodes", "one-node"):
        config = run_config(name, train={"micro_batch_size": 2, "max_steps": 3})
        if name == "two-nodes":
            node0, _ = helpers.launch_two_nodes(config)
            assert "x processes 2 " in node0.stderr and "DeepSpeed ZeRO-2" in node0.stderr
        else:
            helpers.launch(config, processes=2)
        runs[name] = [m["loss"] for m in helpers.metrics(tmp_path / name)]
    assert len(runs["two-nodes"]) == 3
    assert runs["two-nodes"] == pytest.approx(runs["one-node"], rel=1e-6)
    assert (tmp_path / "two-nodes" / "checkpoints" / "step-000003" / "COMPLETE").is_file()


def _data_with_bad_records(tmp_path, shapes_data, n=24):
    import shutil

    records = json.loads(shapes_data["train"].read_text())[:n]
    records[5]["image"] = "missing.jpg"
    records[17]["conversations"][1]["value"] = " "
    root = tmp_path / "bad-data"
    shutil.copytree(shapes_data["train_images"], root / "images")
    (root / "chat.json").write_text(json.dumps(records))
    return dict(shapes_data, train=root / "chat.json", train_images=root / "images")


def test_bad_samples_are_counted_in_the_logs_and_the_budget_stops_the_run(
    tmp_path, run_config, shapes_data, fresh_accelerate_state, capsys
):
    from llava_loop.data.skips import TooManySkips
    from llava_loop.loop import train

    data = _data_with_bad_records(tmp_path, shapes_data)
    cfg = load_config(run_config(shapes=data, train={"max_steps": 6}, data={"max_skip_fraction": 0.1}))
    train(cfg)  # 24 records, 4 per step: one epoch meets both bad records
    last = helpers.metrics(cfg.output_dir)[-1]
    assert last["bad_records"] == 2  # distinct bad records: what the budget counts
    assert (
        last["skipped/missing_image"] >= 1 and last["skipped/empty_answer"] >= 1
    )  # events (a replacement can retry one)
    assert all(m["samples_per_s"] > 0 for m in helpers.metrics(cfg.output_dir))
    err = capsys.readouterr().err
    assert "skipping bad sample train_000005 (missing_image" in err and "train_000017 (empty_answer" in err

    strict = load_config(run_config("strict", shapes=data, train={"max_steps": 6}, data={"max_skip_fraction": 0.05}))
    with pytest.raises(TooManySkips, match=r"2 of 24 records .* were skipped.*max_skip_fraction=0.05"):
        train(strict)


def test_a_broken_data_file_fails_before_the_model_loads(
    tmp_path, run_config, shapes_data, monkeypatch, fresh_accelerate_state
):
    from llava_loop import loop
    from llava_loop.data.records import RecordError

    broken = tmp_path / "broken.json"
    broken.write_text(
        '[{"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"}]},\n{"id": "b"}]'
    )
    cfg = load_config(run_config(shapes=dict(shapes_data, train=broken)))

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was validated")

    monkeypatch.setattr(loop, "load_model", must_not_load)
    with pytest.raises(RecordError, match=r"broken.json: record 1 \(id 'b'\): no 'conversations' list"):
        loop.Trainer(cfg)


def test_a_loss_keyword_it_does_not_take_fails_before_the_model_loads(run_config, monkeypatch, fresh_accelerate_state):
    from llava_loop import loop
    from llava_loop.errors import UserError

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model loaded before the loss was bound"))
    cfg = load_config(run_config(loss={"fn": "llava_loop.losses:ce_with_z_loss", "kwargs": {"z_wieght": 0.1}}))
    with pytest.raises(
        UserError, match=r"loss llava_loop.losses:ce_with_z_loss: .*'z_wieght'.*\(it takes \(model, batch.*z_weight"
    ):
        loop.Trainer(cfg)


def _val_copy(tmp_path, shapes_data, missing: int | None):
    """The held-out set with ``missing`` of its images removed (None: the whole image folder is missing)."""
    import shutil

    images = tmp_path / "val-images"
    if missing is not None:
        shutil.copytree(shapes_data["val_images"], images)
        for path in sorted(images.iterdir())[:missing]:
            path.unlink()
    return dict(shapes_data, val_images=images)


def test_a_broken_held_out_set_never_costs_the_training(
    tmp_path, run_config, shapes_data, fresh_accelerate_state, capsys
):
    """Every held-out image missing: training completes, the final checkpoint is saved, and the warning names
    data.eval_image_dir, not data.image_dir."""
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.loop import train

    data = _val_copy(tmp_path, shapes_data, missing=None)
    train(load_config(run_config(shapes=data, train={"max_steps": 2})))
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-000002"]
    evals = helpers.metrics(tmp_path / "run", "eval")
    assert evals[-1]["eval_left_out"] == 32 and evals[-1]["eval_tokens"] == 0
    err = capsys.readouterr().err
    assert "32 of 32 samples left out (missing_image x32" in err and f"data.eval_image_dir={data['val_images']}" in err


def test_held_out_samples_are_left_out_never_replaced(
    tmp_path, run_config, shapes_data, tiny_processor, fresh_accelerate_state
):
    """1 of 32 held-out images missing: the eval loss is over the 31 others exactly, and says one was left out."""
    from llava_loop.loop import Trainer
    from llava_loop.validate import heldout_loss_sums

    data = _val_copy(tmp_path, shapes_data, missing=1)
    trainer = Trainer(load_config(run_config(shapes=data, train={"max_steps": 1})))
    rng = torch.get_rng_state()
    metrics = trainer.eval_loss()
    assert torch.equal(rng, torch.get_rng_state())  # evaluating draws nothing from the training RNG
    assert metrics["eval_left_out"] == 1
    kept = [trainer.eval_set[i] for i in range(len(trainer.eval_set)) if trainer.eval_set[i]["input_ids"] is not None]
    assert len(kept) == 31
    batch = Collator(tiny_processor.tokenizer.pad_token_id)(kept)
    trainer.model.eval()
    loss_sum, tokens, left_out = heldout_loss_sums(trainer.model, [batch], trainer.loss_fn)
    assert left_out == [] and metrics["eval_tokens"] == tokens
    assert metrics["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-6)


def test_a_hook_or_loss_that_cannot_be_imported_fails_before_the_model_loads(
    run_config, monkeypatch, fresh_accelerate_state
):
    from llava_loop import loop
    from llava_loop.errors import UserError

    monkeypatch.setattr(
        loop, "load_model", lambda *a, **k: pytest.fail("the model loaded before the config was checked")
    )
    with pytest.raises(UserError, match=r"hook 'no_such_pkg.hooks:Hook': cannot import module 'no_such_pkg.hooks'"):
        loop.Trainer(load_config(run_config(hooks=["no_such_pkg.hooks:Hook"])))
    with pytest.raises(
        UserError, match=r"loss 'llava_loop.losses:no_such_loss': module 'llava_loop.losses' has no attribute"
    ):
        loop.Trainer(load_config(run_config("run2", loss="llava_loop.losses:no_such_loss")))


def test_unusable_output_dirs_and_holdouts_get_clear_errors(tmp_path, run_config, fresh_accelerate_state):
    from llava_loop.data.records import RecordError
    from llava_loop.errors import UserError
    from llava_loop.loaders import split_records
    from llava_loop.loop import Trainer

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config(run_config())
    cfg.output_dir = str(blocker / "run")  # below a file: cannot be created (root ignores permission bits)
    with pytest.raises(UserError, match=r"output_dir .*a-file/run is not writable"):
        Trainer(cfg)
    cfg = load_config(run_config("run2", data={"eval_path": ""}, eval={"holdout": 96}))
    with pytest.raises(RecordError, match=r"eval.holdout=96 leaves no training records: .* holds 96"):
        split_records(cfg)


@pytest.mark.slow
def test_a_killed_data_loader_worker_is_reported_not_a_traceback(run_config):
    config = run_config(hooks=["plugins:KillWorkersAtStep2"], train={"max_steps": 40, "micro_batch_size": 2})
    out = helpers.launch(config, "data.num_workers=2", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "a DataLoader worker died" in out.stderr and "Lower data.num_workers (now 2)" in out.stderr
    assert "Traceback" not in out.stderr


def _share_then_wait(queue, sent) -> None:
    queue.put(torch.arange(8.0))  # its storage travels as a file descriptor this process hands out on request
    queue.close()
    queue.join_thread()
    sent.set()
    sent.wait(600)  # stays alive (holding the descriptor) until killed


class _MissingFile(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise FileNotFoundError(f"/data/{i}.jpg")


def test_a_worker_dying_mid_transfer_is_a_worker_death_and_a_workers_own_os_error_is_not():
    """The race the end-to-end test above loses now and then, made certain: the batch is sent, then its sender is
    killed before this process fetches the storage. PyTorch re-raises the transfer's OSError as it is."""
    import multiprocessing
    import signal

    from llava_loop.loaders import worker_death

    ctx = torch.multiprocessing.get_context("fork")
    queue, sent = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_share_then_wait, args=(queue, sent))
    child.start()
    assert sent.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    with pytest.raises((OSError, EOFError)) as dead:
        queue.get(timeout=30)
    assert worker_death(dead.value).startswith(type(dead.value).__name__ + " while receiving a batch it had sent")

    # negative control: a worker's own OSError, re-raised by PyTorch in this process, is the dataset's error
    loader = torch.utils.data.DataLoader(
        _MissingFile(), num_workers=1, multiprocessing_context=multiprocessing.get_context("fork")
    )
    with pytest.raises(FileNotFoundError) as own:
        next(iter(loader))
    assert worker_death(own.value) is None
    assert worker_death(RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. ")) == (
        "DataLoader worker (pid 7) is killed by signal: Killed."
    )
    assert worker_death(RuntimeError("CUDA out of memory")) is None

    # the report turns PyTorch's SIGCHLD handler off before it looks (another worker dying mid-way raised it there,
    # under load); an error that is not a death gets the handler back
    from llava_loop.config import Config
    from llava_loop.data.dataset import DataError
    from llava_loop.loaders import worker_deaths_reported

    def handler(*_):
        pass

    previous = signal.signal(signal.SIGCHLD, handler)
    try:
        with pytest.raises(FileNotFoundError), worker_deaths_reported(Config()):
            raise own.value
        assert signal.getsignal(signal.SIGCHLD) is handler
        with pytest.raises(DataError, match="a DataLoader worker died"), worker_deaths_reported(Config()):
            raise dead.value
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_eval_holdout_splits_the_training_records_deterministically(run_config):
    from llava_loop.loaders import split_records

    cfg = load_config(run_config(data={"eval_path": ""}, eval={"holdout": 8}))
    train, held = split_records(cfg)
    train_ids = {train[i].id for i in range(len(train))}
    held_ids = {held[i].id for i in range(len(held))}
    assert (len(train_ids), len(held_ids)) == (88, 8) and not train_ids & held_ids
    again_train, again_held = split_records(cfg)
    assert {again_held[i].id for i in range(len(again_held))} == held_ids
