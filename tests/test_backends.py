"""The backend seam: what each backend decides from the training config, with real Accelerate and DeepSpeed
objects (in one process; the multi-process behaviour is tested through launches in test_loop/test_checkpoint)."""

from __future__ import annotations

import math

import pytest
import torch

from llava_loop.config import load_config

import helpers


@pytest.fixture(autouse=True)
def _restore_environment():
    """Accelerate records its choices in os.environ (ACCELERATE_USE_DEEPSPEED...); keep them out of later tests."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _accelerator(precision: str, deepspeed: bool, ds_config: str = "ds_zero2.json"):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(helpers.ROOT / "configs" / ds_config)) if deepspeed else None
    return Accelerator(mixed_precision=precision, deepspeed_plugin=plugin)


def test_zero3_auto_buckets_are_sized_from_the_llm_hidden_size(tiny_model_dir, fresh_accelerate_state):
    """Accelerate reads model.config.hidden_size, which a LlavaConfig lacks (it raises on the "auto" keys): the
    backend fills them from the LLM's hidden size before prepare, and leaves numbers a user set alone."""
    from transformers import AutoConfig

    from llava_loop.backends import backend_for

    backend = backend_for(_accelerator("no", deepspeed=True, ds_config="ds_zero3.json"))
    zero = backend.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == "auto"
    zero["stage3_max_live_parameters"] = 12345
    backend.configure(load_config(None, ["data.path=x", f"model.path={tiny_model_dir}"]))
    h = AutoConfig.from_pretrained(tiny_model_dir).text_config.hidden_size
    assert (
        zero["reduce_bucket_size"],
        zero["stage3_prefetch_bucket_size"],
        zero["stage3_param_persistence_threshold"],
    ) == (h * h, int(0.9 * h * h), 10 * h)
    assert zero["stage3_max_live_parameters"] == 12345
    assert backend.rank_files() == (
        "pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        "pytorch_model/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
    )


@pytest.mark.parametrize(
    "precision, accum, fp32_accumulation, weights",
    [
        ("bf16", 4, True, torch.bfloat16),
        ("bf16", 1, False, torch.bfloat16),
        ("no", 4, False, torch.float32),
    ],
)
def test_deepspeed_bf16_accumulates_in_fp32_and_loads_weights_as_the_engine_will_cast_them(
    precision, accum, fp32_accumulation, weights, fresh_accelerate_state
):
    from llava_loop.backends import DeepSpeedBackend, backend_for

    acc = _accelerator(precision, deepspeed=True)
    backend = backend_for(acc)
    backend.configure(load_config(None, ["data.path=x", f"train.grad_accum={accum}"]))
    assert isinstance(backend, DeepSpeedBackend)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds.get("data_types", {}).get("grad_accum_dtype") == "fp32") is fp32_accumulation
    assert ds["gradient_accumulation_steps"] == accum
    assert backend.weights_dtype() == weights


@pytest.mark.parametrize(
    "device_type, precision, loaded",
    [
        ("cuda", "bf16", torch.bfloat16),
        ("cuda", "no", torch.float32),
        ("cpu", "bf16", torch.float32),
    ],
)
def test_the_plain_backend_loads_bf16_only_under_bf16_on_a_gpu(device_type, precision, loaded):
    from llava_loop.backends import plain_weights_dtype

    assert plain_weights_dtype(device_type, precision) == loaded


def _lora_model(model_dir, dtype):
    from llava_loop.config import LoraConfig
    from llava_loop.modes import apply_mode, param_groups
    from llava_loop.runtime import load_model

    model = apply_mode(load_model(model_dir, dtype=dtype)[0], "lora", LoraConfig(r=4, alpha=8, dropout=0.0))
    return model, param_groups(model, lr=1e-3, projector_lr=0.0, weight_decay=0.0)


def _dtypes(model, trained: bool) -> set:
    return {p.dtype for p in model.parameters() if p.requires_grad is trained}


@pytest.mark.parametrize("deepspeed, trained", [(False, torch.float32), (True, torch.bfloat16)])
def test_trained_weights_take_the_backends_dtype_and_frozen_ones_keep_the_loaded_one(
    deepspeed, trained, tiny_model_dir, fresh_accelerate_state
):
    """bf16-loaded LoRA (as the plain backend loads on a GPU under bf16, and DeepSpeed under bf16): PEFT made the
    adapters fp32. The plain backend trains fp32 master weights (adapters and projector cast up); DeepSpeed keeps
    its masters in the optimizer, so everything stays bf16 (adapters cast down). The optimizer holds the same
    parameter objects, and CPU keeps torch's default kernel."""
    from llava_loop.backends import backend_for

    model, groups = _lora_model(tiny_model_dir, torch.bfloat16)
    adapters = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
    assert adapters == {torch.float32} and _dtypes(model, trained=False) == {torch.bfloat16}
    optimizer = backend_for(_accelerator("bf16", deepspeed=deepspeed)).make_optimizer(model, groups, lr=1e-3)
    assert _dtypes(model, trained=True) == {trained} and _dtypes(model, trained=False) == {torch.bfloat16}
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters() if p.requires_grad}
    assert optimizer.defaults["fused"] is None


@pytest.mark.parametrize("device_type, fused", [("cuda", True), ("cpu", None)])
def test_adamw_is_fused_where_the_weights_it_steps_live_on_a_gpu(device_type, fused, tiny_model_dir):
    """The choice itself (the fused kernel checks devices at the first step, so a CPU model can be built for it);
    on CPU torch's default, not fused=False, which would also turn foreach off."""
    from llava_loop.backends import make_adamw

    model, groups = _lora_model(tiny_model_dir, torch.float32)
    optimizer = make_adamw(model, groups, trained_dtype=torch.float32, device_type=device_type, lr=1e-3)
    assert optimizer.defaults["fused"] is fused and optimizer.defaults["foreach"] is None


def _trainer(run_config, precision):
    from llava_loop.loop import Trainer

    config = run_config(
        mode="lora",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        train={"max_steps": 2, "precision": precision},
    )
    return Trainer(load_config(config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU half; the GPU half is the next test")
def test_a_bf16_run_on_cpu_keeps_every_weight_fp32_and_the_default_adamw(run_config, fresh_accelerate_state):
    trainer = _trainer(run_config, "bf16")
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert trainer.optimizer.optimizer.defaults["fused"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_bf16_run_on_a_gpu_holds_frozen_towers_in_bf16_and_trains_fp32_weights_with_fused_adamw(
    tmp_path, run_config, fresh_accelerate_state
):
    trainer = _trainer(run_config, "bf16")
    model = trainer.model
    assert _dtypes(model, trained=False) == {torch.bfloat16} and _dtypes(model, trained=True) == {torch.float32}
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.fit()
    losses = [m["loss"] for m in helpers.metrics(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], b) for n, b in before.items() if ".lora_B." in n)


@pytest.mark.parametrize("pin", [True, False])
def test_pinned_host_copies_do_not_block(pin, fresh_accelerate_state):
    from llava_loop.runtime import make_accelerator

    accelerator = make_accelerator(load_config(None, ["data.path=x", f"data.pin_memory={str(pin).lower()}"]))
    assert accelerator.non_blocking is pin


def test_deepspeed_is_pinned_to_at_least_the_validated_version():
    from importlib.metadata import requires, version

    from packaging.version import Version

    requirement = next(r for r in requires("llava-loop") if r.startswith("deepspeed"))
    assert ">=0.19.8" in requirement
    assert Version(version("deepspeed")) >= Version("0.19.8")
