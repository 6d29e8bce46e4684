"""What only a CUDA GPU runs: the varlen attention kernel, Liger's kernels and compiled layers in bf16. CI has no GPU,
so these skip there; bench/device.sh runs them on the lent GPU machine after the benchmark rows.

Each training run is a process of its own (`python train.py`): Liger patches transformers' Qwen2 classes and RoPE
for the whole process, so a compiled run after a Liger one in the same process would be Liger + compile."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import helpers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/device.sh runs these)")


def test_one_varlen_kernel_equals_sdpa_per_sample():
    """A packed row of samples of 7, 130 and 64 tokens with grouped KV heads: the GPU kernel's output (forward and
    gradients) equals sdpa run on each sample alone; one sample for the whole row (the control) does not."""
    from llava_loop import attention

    assert attention.varlen_kernel() is not None
    torch.manual_seed(0)
    bounds = [0, 7, 137, 201]
    q = torch.randn(1, 8, 201, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 201, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    class Module(torch.nn.Module):
        num_key_value_groups, scaling, is_causal, training = 4, 64**-0.5, True, False

    module = Module()
    packed = attention.PackedSamples(bounds, torch.tensor(bounds, dtype=torch.int32, device="cuda"), 130)
    out = attention._one_kernel(module, q, k, v, packed, {})
    reference = attention._per_sample(module, q, k, v, bounds, {})
    assert out.shape == reference.shape == (1, 201, 8, 64)
    assert (out.float() - reference.float()).abs().max() < 2e-2
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    reference_grads = torch.autograd.grad(reference.float().square().sum(), (q, k, v))
    for g, r in zip(grads, reference_grads):
        assert (g.float() - r.float()).abs().max() < 5e-2 * r.float().abs().max()
    whole = attention.PackedSamples([0, 201], torch.tensor([0, 201], dtype=torch.int32, device="cuda"), 201)
    assert (attention._one_kernel(module, q, k, v, whole, {}).float() - reference.float()).abs().max() > 0.1


@pytest.fixture(scope="module")
def run_losses(tmp_path_factory, tiny_model_dir, shapes_data):
    """``run_losses(name, **train)``: the step losses of a 4-step bf16 `full` run in its own `python train.py`."""
    root = tmp_path_factory.mktemp("gpu-runs")

    def losses(name: str, **train) -> list[float]:
        config = helpers.write_config(
            root / f"{name}.yaml",
            model=tiny_model_dir,
            shapes=shapes_data,
            output_dir=root / name,
            train={"max_steps": 4, "precision": "bf16", "liger": "off", **train},
        )
        helpers.launch(config, timeout=150)
        return [m["loss"] for m in helpers.metrics(root / name)]

    return losses


@pytest.fixture(scope="module")
def plain_losses(run_losses):
    return run_losses("plain")


def test_compiled_layers_alone_train_like_the_plain_run(run_losses, plain_losses):
    """Compiled decoder layers without Liger give the plain run's step losses within bf16's precision; a run on
    other data (seed 7, the control) does not."""
    assert run_losses("compiled", compile=True) == pytest.approx(plain_losses, rel=2e-2)
    assert run_losses("other-data", seed=7) != pytest.approx(plain_losses, rel=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel (the liger extra)")
def test_liger_kernels_train_like_the_plain_run(run_losses, plain_losses):
    """Liger's RMSNorm, SwiGLU and RoPE kernels give the plain run's step losses within bf16's precision."""
    assert run_losses("liger", liger="on") == pytest.approx(plain_losses, rel=2e-2)
