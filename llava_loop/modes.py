"""Training modes as explicit parameter choices, applied in one place.

| mode          | vision tower | projector | LLM                               |
|---------------|--------------|-----------|-----------------------------------|
| projector     | frozen       | trained   | frozen                            |
| lora          | frozen       | trained   | LoRA adapters on its linears only |
| freeze_vision | frozen       | trained   | trained                           |
| full (none)   | trained      | trained   | trained                           |

Vision layers after the feature layer (``vision_feature_layer=-2``) and the tower's post-layernorm never
reach the loss; they stay frozen in every mode so no optimizer state or DDP bookkeeping is wasted, and the
layers run as the identity, so no compute is either.

LoRA adapters go on the language model's ``nn.Linear`` layers, found by module type (``lora.targets:
[all-linear]``) so every LLM family gets them without naming its projections; the vision tower never does.

Gradient checkpointing goes only where backward must pass: the LLM always, the vision tower only when it
trains (``full``). It is non-reentrant, so no input-grad hooks are needed: a frozen vision tower runs
forward once per micro-batch and its outputs carry no autograd graph.
"""

from __future__ import annotations

import re

import torch

from .config import LoraConfig
from .errors import UserError
from .parts import LLM, PARTS, PROJECTOR, VISION, base_llava, count_params, part_of


def deepest_feature_layer(config) -> int:
    """How many vision encoder layers the selected features pass through (``hidden_states[k]`` is the output
    of layer ``k - 1``; ``hidden_states[0]`` the embeddings)."""
    n_layers = config.vision_config.num_hidden_layers
    layers = (
        config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [config.vision_feature_layer]
    )
    return max(layer % (n_layers + 1) for layer in layers)


def unused_vision_param_names(model) -> set[str]:
    """Vision-tower parameters that cannot affect the selected features."""
    deepest = deepest_feature_layer(model.config)
    unused = [f"encoder.layers.{i}." for i in range(deepest, model.config.vision_config.num_hidden_layers)]
    unused += ["post_layernorm.", "head."]
    names = set()
    for name, _ in model.named_parameters():
        if part_of(name) == VISION:
            tail = name.split("vision_tower.", 1)[1].removeprefix("vision_model.")
            if tail.startswith(tuple(unused)):
                names.add(name)
    return names


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def skip_unused_vision_layers(model) -> int:
    """Run the vision layers after the feature layer as the identity: their output is never read. The layers
    and their weights stay, so checkpoints and exports are complete. Returns how many layers are skipped."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    deepest = deepest_feature_layer(model.config)
    for layer in layers[deepest:]:
        layer.forward = _pass_through  # hidden_states[k > deepest] become copies, which nothing selects
    return len(layers) - deepest


ALL_LINEAR = "all-linear"


def lora_target_regex(model, targets: list[str]) -> str:
    """A PEFT ``target_modules`` regex for the language model's linear layers: all of them (``all-linear``), or
    those with the given names, each of which must name a linear layer of this LLM."""
    llm = model.model.language_model
    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, module in llm.named_modules() if isinstance(module, torch.nn.Linear)}
    )
    if targets == [ALL_LINEAR]:
        names = linear
    else:
        unknown = sorted(set(targets) - set(linear))
        if unknown:
            raise UserError(
                f"lora.targets: {unknown} are not linear layers of this {model.config.text_config.model_type} "
                f"LLM; its linear layers are {linear} (or use [{ALL_LINEAR}])"
            )
        names = targets
    return rf"^(?:.*\.)?language_model\..*\.(?:{'|'.join(map(re.escape, names))})$"


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
    skip_unused_vision_layers(model)
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
            target_modules=lora_target_regex(model, lora.targets),
            modules_to_save=["multi_modal_projector"],  # trained fully and saved with the adapter
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)  # before checkpointing, or PEFT hooks the inputs to require grad
        for name, param in model.named_parameters():  # a tiled build's image_newline trains with the projector:
            if name.endswith(".image_newline"):  # a bare parameter, which modules_to_save cannot name
                param.requires_grad_(True)
    if gradient_checkpointing:
        enable_checkpointing(model, trainable_parts)
    return model


def enable_checkpointing(model, trainable_parts: set[str]) -> None:
    """Non-reentrant activation checkpointing on the LLM, and on the vision tower only if it trains."""
    llava = base_llava(model)
    towers = [llava.model.language_model] + ([llava.model.vision_tower] if VISION in trainable_parts else [])
    for tower in towers:
        if hasattr(tower, "activation_checkpointing_enable"):
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers 5.17 (the GPU machine's) has only the name that later versions deprecate
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        # matrices decay, biases and norms do not; under ZeRO-3 the tensor is an empty 1-d partition: use ds_shape
        decay = len(getattr(param, "ds_shape", param.shape)) >= 2
        groups.setdefault((is_projector, decay), []).append(param)
    out = []
    for (is_projector, decay), params in sorted(groups.items()):
        name = f"{'projector' if is_projector else 'model'}/{'decay' if decay else 'no_decay'}"
        out.append(
            {
                "name": name,
                "params": params,
                "lr": group_lr(name, lr=lr, projector_lr=projector_lr),
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
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
