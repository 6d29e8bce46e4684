"""Turn a training checkpoint into a plain Hugging Face model directory.

* ZeRO-2/3 partitions are consolidated into fp32 weights (DeepSpeed's own zero_to_fp32 logic).
* LoRA runs also get ``out/adapter/``: a PEFT adapter (LoRA weights + the trained projector, and a tiled build's
  ``image_newline``) that loads with
  ``PeftModel.from_pretrained(base, out/adapter)``; ``out/`` itself holds the merged full model.
* ``out/`` loads with ``AutoModelForImageTextToText.from_pretrained`` (the Llava, LlavaNext or LlavaOnevision class
  it was built as) and ``AutoProcessor`` alone, and its
  ``README.md`` is a model card (model_card.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backends import backend_class
from .build import save_model_dir
from .checkpoint.files import check_tensor_names, verify
from .config import load_config
from .model_card import write_model_card
from .modes import apply_mode
from .runtime import load_model

EXPORT_INFO = "llava_loop_export.json"  # beside the weights: how the model was trained and must be prompted


def load_trained(checkpoint_dir: str | Path, *, attn_implementation: str = "auto"):
    """Rebuild the model exactly as it was trained (mode applied, LoRA wrapped) with the checkpoint's weights.
    Returns ``(model, processor, cfg, state)``; the model is in eval mode on CPU. Attention is transformers' choice,
    not the training run's kernel: the weights do not depend on it, and flash-attention may not be installed here."""
    checkpoint_dir = Path(checkpoint_dir)
    state = verify(checkpoint_dir, "hash")
    cfg = load_config(checkpoint_dir / "config.yaml")
    model, processor = load_model(state["run"]["model_path"], attn_implementation=attn_implementation)
    model = apply_mode(model, cfg.canonical_mode, cfg.lora)
    params = dict(model.named_parameters())
    aliases = set(model.state_dict()) - set(params)  # tied weights (lm_head.weight) appear once as parameters
    saved = backend_class(state["run"]["backend"], checkpoint_dir).trained_tensors(checkpoint_dir)
    tensors = {k: v for k, v in saved.items() if k not in aliases}
    check_tensor_names(set(tensors), {n for n, p in params.items() if p.requires_grad}, checkpoint_dir)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model.eval(), processor, cfg, state


def save_adapter(model, out: Path) -> None:
    """PEFT's adapter directory, plus the trained ``image_newline`` of a tiled build: a bare parameter, which
    ``modules_to_save`` cannot name and ``save_pretrained`` leaves out. Stored under its PEFT name, it loads with
    ``PeftModel.from_pretrained`` like the rest (PEFT loads the adapter file's tensors by name)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    extra = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.endswith(".image_newline")}
    if extra:
        weights = out / "adapter_model.safetensors"
        save_file({**load_file(weights), **extra}, weights, metadata={"format": "pt"})


def sample_frames_as_trained(processor, cfg) -> None:
    """A OneVision processor given a whole video (a path, through ``pipeline`` or ``apply_chat_template``) samples
    the run's frame count itself. Its rule is transformers': frames from index 0 at an even stride, where training
    took the middle of each share of the clip (data/video.py), and it takes a frame count or a rate, not both, so a
    run's ``data.video_fps`` cap is not carried; ``llava-loop infer --video`` samples as training did, and plain
    transformers does too when handed those frames (``do_sample_frames=False``)."""
    video = getattr(processor, "video_processor", None)
    if video is not None:
        video.do_sample_frames, video.num_frames, video.fps = True, cfg.data.video_frames, None


def export(checkpoint_dir: str | Path, out: str | Path) -> Path:
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    model, processor, cfg, state = load_trained(checkpoint_dir)
    if cfg.canonical_mode == "lora":
        model.peft_config["default"].base_model_name_or_path = state["run"]["model_path"]
        save_adapter(model, out / "adapter")
        model = model.merge_and_unload()
    model.generation_config = type(model.generation_config).from_pretrained(state["run"]["model_path"])
    sample_frames_as_trained(processor, cfg)
    save_model_dir(model, processor, out)
    write_model_card(out, cfg, state, checkpoint_dir)
    info = {
        "checkpoint": str(checkpoint_dir.resolve()),
        "step": state["progress"]["step"],
        "mode": cfg.canonical_mode,
        "base_model": state["run"]["model_path"],
        "adapter": "adapter" if cfg.canonical_mode == "lora" else None,
        **prompt_settings(cfg),
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    if info["adapter"]:  # the adapter, loaded on its base (or copied elsewhere), is prompted as the run trained
        (out / "adapter" / EXPORT_INFO).write_text(json.dumps({**info, "adapter": None}, indent=2))
    return out


def prompt_settings(cfg) -> dict:
    """What laying out a prompt for this run's model needs, beyond its tokenizer and processor: ``max_length``
    is the run's, so held-out records are truncated or skipped as the training loop's evaluation did."""
    d = cfg.data
    return {
        "image_aspect_ratio": d.image_aspect_ratio,
        "system_prompt": d.system_prompt,
        "template": d.template,
        "caption_end": d.caption_end,
        "max_length": d.max_length,
        "video_frames": d.video_frames,
        "video_fps": d.video_fps,
    }
