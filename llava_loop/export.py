"""Turn a training checkpoint into a plain Hugging Face model directory.

* ZeRO-2 optimizer partitions are consolidated into fp32 weights (DeepSpeed's own zero_to_fp32 logic).
* LoRA runs also get ``out/adapter/``: a PEFT adapter (LoRA weights + the trained projector) that loads with
  ``PeftModel.from_pretrained(base, out/adapter)``; ``out/`` itself holds the merged full model.
* ``out/`` loads with ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .build import save_model_dir
from .checkpoint import CheckpointError, scan_pickles, verify
from .config import load_config
from .modes import apply_mode
from .runtime import load_model


def trained_tensors(checkpoint_dir: Path, deepspeed: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors a checkpoint holds, by parameter name, in fp32."""
    if deepspeed:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        scan_pickles(checkpoint_dir)  # zero_to_fp32 unpickles without weights_only
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="pytorch_model"))
    from safetensors.torch import load_file

    return load_file(checkpoint_dir / "model.safetensors")


def load_trained(checkpoint_dir: str | Path):
    """Rebuild the model exactly as it was trained (mode applied, LoRA wrapped) with the checkpoint's weights.
    Returns ``(model, processor, cfg, state)``; the model is in eval mode on CPU."""
    checkpoint_dir = Path(checkpoint_dir)
    state = verify(checkpoint_dir, "hash")
    cfg = load_config(checkpoint_dir / "config.yaml")
    model, processor = load_model(state["run"]["model_path"], attn_implementation=cfg.model.attn_implementation)
    model = apply_mode(model, cfg.canonical_mode, cfg.lora)
    params = dict(model.named_parameters())
    aliases = set(model.state_dict()) - set(params)  # tied weights (lm_head.weight) appear once as parameters
    tensors = {k: v for k, v in trained_tensors(checkpoint_dir, state["run"]["deepspeed"]).items() if k not in aliases}
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        raise CheckpointError(
            f"{checkpoint_dir}: holds {len(tensors)} tensors but the {cfg.canonical_mode} model trains {len(trainable)} "
            f"(e.g. missing {sorted(trainable - set(tensors))[:3]}, unexpected {sorted(set(tensors) - trainable)[:3]})"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model.eval(), processor, cfg, state


def export(checkpoint_dir: str | Path, out: str | Path) -> Path:
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    model, processor, cfg, state = load_trained(checkpoint_dir)
    if cfg.canonical_mode == "lora":
        model.peft_config["default"].base_model_name_or_path = state["run"]["model_path"]
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.generation_config = type(model.generation_config).from_pretrained(state["run"]["model_path"])
    save_model_dir(model, processor, out)
    (out / "llava_loop_export.json").write_text(json.dumps({
        "checkpoint": str(checkpoint_dir.resolve()), "step": state["progress"]["step"], "mode": cfg.canonical_mode,
        "base_model": state["run"]["model_path"], "adapter": "adapter" if cfg.canonical_mode == "lora" else None,
        "image_aspect_ratio": cfg.data.image_aspect_ratio, "system_prompt": cfg.data.system_prompt,
    }, indent=2))
    return out
