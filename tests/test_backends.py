"""The backend seam: what each backend decides from the training config, with real Accelerate and DeepSpeed
objects (in one process; the multi-process behaviour is tested through launches in test_loop/test_checkpoint)."""

from __future__ import annotations

import pytest
import torch

import helpers
from llava_loop.config import load_config


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
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
        == (h * h, int(0.9 * h * h), 10 * h)
    assert zero["stage3_max_live_parameters"] == 12345
    assert backend.rank_files() == ("pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                                    "pytorch_model/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")


@pytest.mark.parametrize("precision, accum, fp32_accumulation, weights", [
    ("bf16", 4, True, torch.bfloat16), ("bf16", 1, False, torch.bfloat16), ("no", 4, False, torch.float32),
])
def test_deepspeed_bf16_accumulates_in_fp32_and_loads_weights_as_the_engine_will_cast_them(
        precision, accum, fp32_accumulation, weights, fresh_accelerate_state):
    from llava_loop.backends import DeepSpeedBackend, backend_for

    acc = _accelerator(precision, deepspeed=True)
    backend = backend_for(acc)
    backend.configure(load_config(None, ["data.path=x", f"train.grad_accum={accum}"]))
    assert isinstance(backend, DeepSpeedBackend)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds.get("data_types", {}).get("grad_accum_dtype") == "fp32") is fp32_accumulation
    assert ds["gradient_accumulation_steps"] == accum
    assert backend.weights_dtype() == weights


def test_plain_backend_keeps_fp32_master_weights_under_bf16_autocast(fresh_accelerate_state):
    from llava_loop.backends import PlainBackend, backend_for

    backend = backend_for(_accelerator("bf16", deepspeed=False))
    assert isinstance(backend, PlainBackend) and backend.weights_dtype() == torch.float32


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
