"""Fused kernels (llava_loop/kernels.py): regional torch.compile trains to the eager run's losses; Liger's kernels
are applied only where they can run, and asking for them elsewhere is refused before training."""

from __future__ import annotations

import pytest

from llava_loop.errors import UserError

import helpers


def _run(tmp_path, run_config, name, **train):
    config = run_config(
        name,
        mode="full",
        train={"max_steps": 2, **train},
    )
    helpers.train_here(config)
    return [m["loss"] for m in helpers.metrics(tmp_path / name)]


@pytest.mark.slow
def test_compiled_decoder_layers_train_to_the_eager_losses(tmp_path, run_config):
    """train.compile: the same step losses as eager to 1e-6 (inductor reorders float sums), and the layers really
    ran compiled (dynamo compiled graphs). Negative control: a 1% higher learning rate moves step 2's loss by far
    more than the tolerance."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _run(tmp_path, run_config, "eager")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = _run(tmp_path, run_config, "compiled", compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before
    assert compiled == pytest.approx(eager, rel=1e-6)
    nudged = _run(tmp_path, run_config, "nudged", lr=1.01e-3)
    assert abs(nudged[1] - eager[1]) > 100 * 1e-6 * abs(eager[1])
    torch._dynamo.reset()


def test_liger_is_left_out_where_it_cannot_run_and_refused_when_insisted_on(tmp_path, run_config):
    """On this CPU machine (no CUDA) train.liger=auto trains without Liger; train.liger=on stops naming why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: Liger can run here (bench/device.sh checks it)")
    assert len(_run(tmp_path, run_config, "auto", liger="auto", max_steps=1)) == 1
    with pytest.raises(UserError, match="train.liger=on: .*CUDA GPU"):
        _run(tmp_path, run_config, "on", liger="on", max_steps=1)
