"""What only a CUDA GPU runs: the varlen attention kernel, Liger's kernels, compiled layers in bf16. CI has no GPU,
so these skip there; bench/device.sh runs them on the lent GPU machine before the benchmark."""

from __future__ import annotations

import pytest
import torch

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


def _losses(tmp_path, run_config, name, **train):
    import helpers

    config = run_config(
        name,
        mode="full",
        train={"max_steps": 3, "precision": "bf16", **train},
    )
    helpers.train_here(config)
    return [m["loss"] for m in helpers.metrics(tmp_path / name)]


def test_liger_and_compiled_bf16_runs_train_like_the_plain_one(tmp_path, run_config):
    """bf16 on the GPU: Liger's kernels and compiled decoder layers give the plain run's step losses within bf16's
    precision."""
    plain = _losses(tmp_path, run_config, "plain", liger="off")
    liger = _losses(tmp_path, run_config, "liger", liger="on")
    compiled = _losses(tmp_path, run_config, "compiled", liger="off", compile=True)
    assert liger == pytest.approx(plain, rel=2e-2) and compiled == pytest.approx(plain, rel=2e-2)
