"""The three parts of a LLaVA model (LLaVA-NeXT and OneVision alike), told apart by parameter name.

Names are matched by substring, so the same rule works on the bare model, under a PEFT wrapper
(``base_model.model.model.vision_tower...``) and under a DeepSpeed engine (``module.model...``).
"""

from __future__ import annotations

from collections import Counter

import torch

VISION = "vision_tower"
PROJECTOR = "projector"
LLM = "llm"
PARTS = (VISION, PROJECTOR, LLM)


def base_llava(model):
    """The LLaVA model itself (Llava, LlavaNext or LlavaOnevision ForConditionalGeneration), under a PEFT wrapper
    or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def part_of(param_name: str) -> str:
    if ".vision_tower." in f".{param_name}":
        return VISION
    if ".multi_modal_projector." in f".{param_name}" or f".{param_name}".endswith(".image_newline"):
        return PROJECTOR  # image_newline (tiled builds) joins the features the projector makes: it trains with it
    return LLM


def count_params(model: torch.nn.Module, *, trainable_only: bool = False) -> Counter:
    """Parameter count per part (tied weights counted once, as ``named_parameters`` yields them)."""
    counts: Counter = Counter({part: 0 for part in PARTS})
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        counts[part_of(name)] += getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves each rank a shard
    return counts
