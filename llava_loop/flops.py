"""The FLOPs a training step needs, from the model's geometry and the step's real token counts; and MFU.

Counted: matrix products only (elementwise work, norms and softmax are not), what the step must compute in this
mode. Forward of the vision layers that reach the features (``vision_feature_layer``), of the projector and of the
LLM's decoder layers; the LM head at supervised positions only. Backward: through the LLM always (the projector
trains in every mode, so gradients flow back to the image tokens), with weight gradients only where weights train;
LoRA adapters forward and backward; the projector's weight gradients; the vision tower only in ``full``.
Recomputation (gradient checkpointing, the chunked loss) is not useful work and is not counted. (The "6N"
convention, 6 x parameters per token, charges a frozen LLM's weight gradients: at the 0.5B stage-1 shape it
was 1.76x this count.)

A matrix product of an (m x k) by a (k x n) costs 2mkn. Linear layers are read from their ``in_features`` /
``out_features``, so a ZeRO-3 model (whose parameters are empty partitions) is counted like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 peak TFLOP/s by device name, most specific first (vendor datasheets).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU model, or None where it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def device_peak_tflops(accelerator) -> float | None:
    """The peak an MFU of this run is measured against: a known GPU's, in bf16 (the precision it is quoted for)."""
    if accelerator.device.type != "cuda" or accelerator.mixed_precision != "bf16":
        return None
    return peak_tflops(torch.cuda.get_device_name(accelerator.device))


def _linear_weights(module: torch.nn.Module) -> tuple[int, int]:
    """(base, adapter) weights of the nn.Linear layers under ``module``: adapters are PEFT's ``lora_`` layers; the
    frozen original PEFT keeps beside a fully trained module (``modules_to_save``) does not run."""
    base = adapter = 0
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and ".original_module." not in f".{name}.":
            if ".lora_" in f".{name}":
                adapter += layer.in_features * layer.out_features
            else:
                base += layer.in_features * layer.out_features
    return base, adapter


@dataclass(frozen=True)
class FlopsModel:
    """Per-token matrix-product weights of each part, and the widths attention costs scale with."""

    mode: str
    vision_weights: int  # the used vision layers' linears (+ the patch embedding), per vision token
    vision_attention: int  # sum over the used vision layers of their attention width
    vision_tokens: int  # tokens per view in the vision tower (patches, + CLS where there is one)
    image_features: int  # projector outputs per view (a tiled model unpads them before they fill placeholders)
    projector_weights: int
    llm_weights: int  # the decoder layers' linears, per text token
    llm_attention: int  # sum over decoder layers of their query width (heads x head_dim)
    adapter_weights: int  # LoRA A and B, per text token (0 outside lora)
    head_weights: int  # hidden x vocabulary, per supervised token

    @classmethod
    def from_model(cls, model, mode: str) -> FlopsModel:
        """Read off a LLaVA model (bare, under PEFT, on the meta device or partitioned by ZeRO-3)."""
        from .modes import deepest_feature_layer
        from .parts import base_llava

        llava = base_llava(model)
        config = llava.config
        v, t = config.vision_config, config.text_config
        tower = llava.model.vision_tower
        encoder = getattr(tower, "vision_model", tower)
        used = deepest_feature_layer(config)
        layers = encoder.encoder.layers[:used]
        vision = sum(_linear_weights(layer)[0] for layer in layers)
        patch = encoder.embeddings.patch_embedding
        vision += patch.in_channels * patch.out_channels * patch.kernel_size[0] * patch.kernel_size[1]
        patches = (v.image_size // v.patch_size) ** 2
        cls_token = 1 if config.vision_feature_select_strategy == "default" else 0  # "default" drops a CLS token
        llm_base, adapters = _linear_weights(llava.model.language_model)
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return cls(
            mode=mode,
            vision_weights=vision,
            vision_attention=used * v.hidden_size,
            vision_tokens=patches + cls_token,
            image_features=patches,
            projector_weights=_linear_weights(llava.model.multi_modal_projector)[0],
            llm_weights=llm_base,
            llm_attention=t.num_hidden_layers * t.num_attention_heads * head_dim,
            adapter_weights=adapters if mode == "lora" else 0,
            head_weights=t.hidden_size * t.vocab_size,
        )

    def step(self, *, views: int, tokens: int, attention_pairs: int, supervised: int) -> float:
        """The FLOPs one optimizer step needs: ``views`` through the vision tower (images, a tiled image's base view
        and each tile, a video's frames: the projector sees each frame's patches before OneVision pools them),
        ``tokens`` (every text, image- and video-placeholder token) through the LLM, ``attention_pairs`` = the sum
        over samples of length^2, and ``supervised`` positions through the LM head; all summed over micro-batches and
        processes."""
        vision_tokens, features = views * self.vision_tokens, views * self.image_features
        vision = 2 * self.vision_weights * vision_tokens + 4 * self.vision_attention * views * self.vision_tokens**2
        projector = 2 * self.projector_weights * features
        llm = 2 * self.llm_weights * tokens
        attention = 2 * self.llm_attention * attention_pairs  # QK^T and AV, causal: half of 4 L^2 d
        adapters = 2 * self.adapter_weights * tokens
        head = 2 * self.head_weights * supervised
        trains_llm = self.mode in ("freeze_vision", "full")
        needed = (
            vision * (3 if self.mode == "full" else 1)  # forward; in full also its input and weight gradients
            + projector * (3 if self.mode == "full" else 2)  # weight gradients always; input gradients in full
            + llm * (3 if trains_llm else 2)  # input gradients always (to the image tokens); weights where they train
            + attention * 3  # forward, and the backward's two products per product
            + adapters * 3
            + head * (3 if trains_llm else 2)
        )
        return float(needed)
