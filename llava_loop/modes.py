"""Training modes as explicit parameter choices, applied in one place.

| mode          | vision tower | projector | LLM                               |
|---------------|--------------|-----------|-----------------------------------|
| projector     | frozen       | trained   | frozen                            |
| lora          | frozen       | trained   | LoRA adapters on its linears only |
| freeze_vision | frozen       | trained   | trained                           |
| full (none)   | trained      | trained   | trained                           |

Vision layers after the feature layer (``vision_feature_layer=-2``) and CLIP's post-layernorm never
reach the loss; they stay frozen in every mode so no optimizer state or DDP bookkeeping is wasted.

Gradient checkpointing goes only where backward must pass: the LLM always, the vision tower only when it
trains (``full``). It is non-reentrant, so no input-grad hooks are needed: a frozen vision tower runs
forward once per micro-batch and its outputs carry no autograd graph.
"""

from __future__ import annotations

import re

import torch

from .config import LoraConfig
from .parts import LLM, PARTS, PROJECTOR, VISION, count_params, part_of


def unused_vision_param_names(model) -> set[str]:
    """Vision-tower parameters that cannot affect the selected features."""
    config = model.config
    n_layers = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [config.vision_feature_layer]
    deepest = max(layer % (n_layers + 1) for layer in layers)  # hidden_states[k] is the output of layer k-1
    unused = [f"encoder.layers.{i}." for i in range(deepest, n_layers)] + ["post_layernorm."]
    names = set()
    for name, _ in model.named_parameters():
        if part_of(name) == VISION:
            tail = name.split("vision_tower.", 1)[1].removeprefix("vision_model.")
            if tail.startswith(tuple(unused)):
                names.add(name)
    return names


def lora_target_regex(targets: list[str]) -> str:
    """Only the language model's linears: CLIP's attention also has q_proj/k_proj/v_proj."""
    return rf"^(?:.*\.)?language_model\..*\.(?:{'|'.join(map(re.escape, targets))})$"


TRAINABLE_PARTS = {  # mode -> the parts that train (config.MODES is the list of modes)
    "projector": {PROJECTOR},
    "lora": {PROJECTOR},
    "freeze_vision": {PROJECTOR, LLM},
    "full": {VISION, PROJECTOR, LLM},
}


def apply_mode(model, mode: str, lora: LoraConfig | None = None, *, gradient_checkpointing: bool = False):
    """Set ``requires_grad`` for ``mode`` (adding LoRA adapters in lora mode) and return the model to train."""
    trainable_parts = TRAINABLE_PARTS[mode]
    unused = unused_vision_param_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) in trainable_parts and name not in unused)
    if mode == "lora":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        assert lora is not None
        peft_config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(lora.targets),
            modules_to_save=["multi_modal_projector"],  # trained fully and saved with the adapter
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)  # before checkpointing, or PEFT hooks the inputs to require grad
    if gradient_checkpointing:
        enable_checkpointing(model, trainable_parts)
    return model


def enable_checkpointing(model, trainable_parts: set[str]) -> None:
    """Non-reentrant activation checkpointing on the LLM, and on the vision tower only if it trains."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    towers = [llava.model.language_model] + ([llava.model.vision_tower] if VISION in trainable_parts else [])
    for tower in towers:
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        tower.disable_input_require_grads()  # transformers hooks input_ids models; non-reentrant needs no hook


def group_lr(name: str, *, lr: float, projector_lr: float) -> float:
    """The peak learning rate of the AdamW group called ``name`` (see ``param_groups``)."""
    return projector_lr if (name.startswith("projector/") and projector_lr > 0) else lr


def param_groups(model, *, lr: float, projector_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: trainable parameters only; no decay on biases and norms; optional projector lr."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_projector = part_of(name) == PROJECTOR
        decay = param.ndim >= 2
        groups.setdefault((is_projector, decay), []).append(param)
    out = []
    for (is_projector, decay), params in sorted(groups.items()):
        name = f"{'projector' if is_projector else 'model'}/{'decay' if decay else 'no_decay'}"
        out.append({"name": name, "params": params, "lr": group_lr(name, lr=lr, projector_lr=projector_lr),
                    "weight_decay": weight_decay if decay else 0.0})
    return out


def trainable_table(model) -> list[tuple[str, str, str, str]]:
    """Rows of (part, trainable, total, percent) for the start-of-run printout."""
    total, trainable = count_params(model), count_params(model, trainable_only=True)
    rows = []
    for part in (*PARTS, "total"):
        t = sum(trainable.values()) if part == "total" else trainable[part]
        n = sum(total.values()) if part == "total" else total[part]
        rows.append((part, f"{t:,}", f"{n:,}", f"{100 * t / max(n, 1):.2f}%"))
    return rows
