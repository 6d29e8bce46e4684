"""Fused elementwise work in the LLM: at a 0.5B model's width the unfused RMSNorm, SwiGLU and RoPE take about
as long as its matrix products. Two ways to fuse them, both applied once, after the mode and before Accelerate:

* ``train.liger`` (``pip install 'llava-loop[liger]'``): Liger's Triton kernels for the LLM's RMSNorm, SwiGLU MLP
  and RoPE, patched into the loaded model (GPU only). Its fused LM-head cross-entropy is not used: llava_loop's own
  loss already runs the head on supervised rows only, in chunks (losses.py).
* ``train.compile``: regional ``torch.compile`` of each decoder layer (the layers share one compiled graph, so
  compiling costs one layer's time, not the model's); works on CPU too.
"""

from __future__ import annotations

import importlib.util

import torch

from .errors import UserError
from .parts import base_llava


def decoder_layers(model) -> torch.nn.ModuleList:
    """The LLM's decoder layers, under PEFT or not."""
    return base_llava(model).model.language_model.layers


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer in place (``nn.Module.compile``); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def liger_available() -> str | None:
    """Why Liger's kernels cannot run here, or None where they can."""
    if not torch.cuda.is_available():
        return "they need a CUDA GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'llava-loop[liger]')"
    return None


def apply_liger(model, setting: str) -> bool:
    """Patch Liger's RMSNorm, SwiGLU and RoPE into the LLM under ``train.liger`` (auto: where they can run; on: or
    refuse; off: never). Returns whether they were applied."""
    if setting == "off":
        return False
    missing = liger_available()
    if missing:
        if setting == "on":
            raise UserError(f"train.liger=on: Liger's kernels cannot run here: {missing}; use train.liger=auto or off")
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    llava = base_llava(model)
    # dispatched by model type: llava patches its LLM's family with that family's defaults (RMSNorm, SwiGLU, RoPE;
    # RoPE module-wide); the loss stays ours, so neither of Liger's cross-entropies (the fused one would replace
    # the model's forward)
    _apply_liger_kernel_to_instance(model=llava, cross_entropy=False, fused_linear_cross_entropy=False)
    return True
