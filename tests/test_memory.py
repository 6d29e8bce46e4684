"""The memory estimator (llava_loop/memory.py): its per-rank model-state terms against the tensors DeepSpeed
really holds in 2-process ZeRO-2 and ZeRO-3 runs, and its answers at real sizes."""

from __future__ import annotations

import json

import pytest

from llava_loop import memory
from llava_loop.parts import count_params

import helpers


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("setting", ["zero2", "zero3"])
def test_model_state_terms_match_what_deepspeed_holds(setting, mode, tmp_path, run_config, tiny_model_dir):
    from transformers import LlavaForConditionalGeneration

    from llava_loop.config import LoraConfig
    from llava_loop.modes import apply_mode

    config = run_config(
        mode=mode,
        hooks=["plugins:ModelStateBytes"],
        lora={"r": 4, "alpha": 8},
        train={"micro_batch_size": 1, "max_steps": 1},
    )
    accelerate_config = "accelerate_config_zero3.yaml" if setting == "zero3" else "accelerate_config.yaml"
    helpers.launch(config, processes=2, accelerate_config=accelerate_config)
    held = [json.loads((tmp_path / "run" / f"model_state_bytes_rank{r}.json").read_text()) for r in (0, 1)]

    model = apply_mode(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), mode, LoraConfig(r=4, alpha=8))
    total, trainable = sum(count_params(model).values()), sum(count_params(model, trainable_only=True).values())
    expected = memory.model_state_bytes(total, trainable, setting, gpus=2, weight_bytes=4, grad_bytes=4)
    for rank in held:  # fp32 on CPU; partitions are padded to the world size, hence the 1%
        assert rank["weights"] == pytest.approx(expected["weights"], rel=0.01), (rank, expected)
        assert rank["optimizer"] == pytest.approx(expected["optimizer"], rel=0.01), (rank, expected)
    if setting == "zero3":  # and the negative control: ZeRO-2's accounting would be 2x off for ZeRO-3's weights
        assert (
            held[0]["weights"] < 0.6 * memory.model_state_bytes(total, trainable, "zero2", 2, weight_bytes=4)["weights"]
        )


def test_estimates_at_real_sizes_pick_the_smallest_setting_that_fits():
    llm7, llm72 = memory.LLMS["7B"], memory.LLMS["72B"]
    # Qwen2.5-7B + CLIP-L + projector is about 7.9B parameters: 14.8 GiB of bf16 weights on every ZeRO-2 GPU
    full7 = memory.estimate(llm7, "full", "zero2", gpus=8)
    assert full7["weights"] == pytest.approx(
        2 * (llm7.params + memory.CLIP_L_336 + memory.projector_params(llm7)) / memory.GIB
    )
    assert memory.smallest_fit(llm7, "full", 8, 80) == "zero2"
    assert memory.smallest_fit(memory.LLMS["13B"], "full", 8, 80) == "zero2"  # ZeRO-2's limit, as LLaVA found
    assert memory.smallest_fit(memory.LLMS["34B"], "full", 8, 80) == "zero3+offload"
    assert memory.smallest_fit(memory.LLMS["13B"], "full", 8, 48) == "zero3"
    assert memory.smallest_fit(llm72, "full", 8, 80) is None  # 72B full needs more than 8 x 80 GiB
    assert memory.smallest_fit(llm72, "lora", 8, 80) == "zero3"
    assert memory.smallest_fit(llm72, "full", 32, 80) == "zero3+offload"
    for llm in memory.LLMS.values():  # each setting needs less per GPU than the one before, in every mode
        for mode in memory.MODES:
            totals = [memory.estimate(llm, mode, s)["total"] for s in memory.SETTINGS]
            assert totals[0] > totals[1] >= totals[2]


def test_the_cli_names_the_smallest_setting_and_fails_when_none_fits():
    import subprocess
    import sys

    fits = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "memory", "--llm", "34B", "--mode", "full"],
        capture_output=True,
        text=True,
        env=helpers.env(),
    )
    assert fits.returncode == 0 and "smallest setting that fits 8 x 80 GiB: zero3+offload" in fits.stdout
    too_big = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "memory", "--llm", "72B", "--gpus", "8"],
        capture_output=True,
        text=True,
        env=helpers.env(),
    )
    assert too_big.returncode == 1 and "none; add GPUs" in too_big.stdout
