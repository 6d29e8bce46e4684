"""The FLOPs model (llava_loop/flops.py) against a count by hand, for every mode, on a LLaVA built from explicit
geometry: an untied LM head, grouped KV heads, CLIP's CLS token, the unused last vision layer."""

from __future__ import annotations

import pytest
import torch

from llava_loop.config import LoraConfig
from llava_loop.flops import FlopsModel, peak_tflops
from llava_loop.modes import apply_mode

# vision: CLIP, width 64, MLP 256, 3 layers (feature layer -2: 2 used), 336 px / 14 px = 576 patches + CLS
# LLM: width 64, MLP 192, 2 layers, 4 query heads of 16, 2 KV heads, vocabulary 1,000, untied head
V_LAYER = 4 * 64 * 64 + 2 * 64 * 256  # q, k, v, o + fc1, fc2
VISION = 2 * V_LAYER + 3 * 64 * 14 * 14  # two used layers + the patch embedding
PROJECTOR = 64 * 64 + 64 * 64  # linear_1 (vision 64 -> text 64), linear_2
T_LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192  # q, k and v (2 x 16 wide), o, gate/up/down
LLM = 2 * T_LAYER
HEAD = 64 * 1000
ADAPTERS = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 192))  # r=4 on every linear: r(in + out)


def _model():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=336, patch_size=14
    )
    text = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=999,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


COUNTS = {"views": 3, "tokens": 2000, "attention_pairs": 1_500_000, "supervised": 50}


def _by_hand(mode: str) -> float:
    vision_tokens, features = 3 * 577, 3 * 576
    vision = 2 * VISION * vision_tokens + 3 * 4 * (2 * 64) * 577**2  # 3 views: QK^T and AV, not causal, 2 layers
    projector = 2 * PROJECTOR * features
    llm = 2 * LLM * 2000
    attention = 2 * (2 * 4 * 16) * 1_500_000  # causal: half of 4 L^2 d, summed over the 2 layers
    head = 2 * HEAD * 50
    passes = {  # (vision, projector, llm, head) multiples of the forward; attention backward always
        "projector": (1, 2, 2, 2),
        "lora": (1, 2, 2, 2),
        "freeze_vision": (1, 2, 3, 3),
        "full": (3, 3, 3, 3),
    }[mode]
    needed = (
        passes[0] * vision
        + passes[1] * projector
        + passes[2] * llm
        + 3 * attention
        + passes[3] * head
        + (3 * 2 * ADAPTERS * 2000 if mode == "lora" else 0)
    )
    return needed


@pytest.mark.parametrize("mode", ["projector", "lora", "freeze_vision", "full"])
def test_step_flops_match_a_count_by_hand(mode):
    model = apply_mode(_model(), mode, LoraConfig(r=4, alpha=8, dropout=0.0))
    flops = FlopsModel.from_model(model, mode)
    assert (flops.vision_weights, flops.projector_weights, flops.llm_weights, flops.head_weights) == (
        VISION,
        PROJECTOR,
        LLM,
        HEAD,
    )  # the untied head is not also in the LLM's weights
    assert flops.adapter_weights == (ADAPTERS if mode == "lora" else 0)
    assert flops.step(**COUNTS) == pytest.approx(_by_hand(mode), rel=1e-12)


def test_lora_adapters_cost_a_tenth_of_qwen2_5_0_5b_s_forward():
    """At Qwen2.5-0.5B's geometry (hidden 896, MLP 4,864, 2 KV heads of 64) r=64 adapters on every linear layer
    cost about 10% of the decoder layers' forward, not the 1% bench/gpu.py once assumed."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    text = Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14), text_config=text, image_token_id=151_935
    )
    with torch.device("meta"):
        model = apply_mode(LlavaForConditionalGeneration(config), "lora", LoraConfig(r=64, alpha=128))
    flops = FlopsModel.from_model(model, "lora")
    assert 0.095 < flops.adapter_weights / flops.llm_weights < 0.1


def test_peak_flops_by_device_name():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("cpu") is None


def test_every_logged_step_carries_its_flops_and_mfu(tmp_path, run_config, tiny_model_dir, tiny_processor):
    """A run's metrics.jsonl: each step's ``flops`` equals the FLOPs model over the samples that step consumed
    (re-encoded here from their ids), ``model_tflops_per_s`` is that over the step time, and ``mfu`` is that over
    ``train.peak_tflops``."""
    from llava_loop.data.collate import Collator
    from llava_loop.runtime import load_model

    import helpers

    config = run_config(
        mode="lora",
        lora={"r": 4, "alpha": 8},
        train={"micro_batch_size": 2, "grad_accum": 2, "max_steps": 2, "log_sample_ids": True, "peak_tflops": 0.5},
    )
    helpers.train_here(config)
    steps = helpers.metrics(tmp_path / "run")
    from llava_loop.config import load_config
    from llava_loop.loaders import make_datasets

    train_set, _ = make_datasets(load_config(config), tiny_processor)
    records = {sample["id"]: sample for sample in (train_set[i] for i in range(len(train_set)))}
    model = apply_mode(load_model(tiny_model_dir)[0], "lora", LoraConfig(r=4, alpha=8))
    flops = FlopsModel.from_model(model, "lora")
    for m in steps:
        batch = Collator(tiny_processor.tokenizer.pad_token_id)([records[i] for i in m["sample_ids"]])
        needed = flops.step(
            views=batch["n_views"],
            tokens=batch["n_tokens"],
            attention_pairs=batch["n_attention_pairs"],
            supervised=batch["n_label_tokens"],
        )
        assert m["flops"] == pytest.approx(needed, rel=1e-12) and batch["n_views"] == 4
        assert m["model_tflops_per_s"] == pytest.approx(needed / m["step_time"] / 1e12, rel=1e-9)
        assert m["mfu"] == pytest.approx(m["model_tflops_per_s"] / 0.5, rel=1e-12)
