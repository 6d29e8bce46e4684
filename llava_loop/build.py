"""Compose a LLaVA model from a CLIP vision checkpoint and a causal-LM (Qwen2/Qwen2.5) checkpoint.

The result is one directory that plain ``transformers`` loads: ``LlavaForConditionalGeneration``
weights (safetensors), a ``LlavaProcessor`` (the LLM's tokenizer and chat template plus a CLIP image
processor) and a generation config that stops at the end-of-turn token.

Weights are copied tensor by tensor with an explicit name map; any source tensor with no home, or any
target tensor left unwritten (other than the fresh projector), is an error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .errors import UserError
from .parts import PARTS, count_params
from .template import IMAGE_TOKEN, TemplateError, render, turn_end_token

# LLaVA-1.5: features from the penultimate CLIP layer, CLS token dropped.
VISION_FEATURE_LAYER = -2
VISION_FEATURE_SELECT = "default"
PAD_TOKEN_FALLBACK = "<|endoftext|>"  # Qwen's pad token


class BuildError(UserError):
    """The inputs to ``build`` cannot be composed; the message says which input and why."""


@dataclass
class BuildReport:
    out: Path | None
    params: dict[str, int]
    vocab_size: int
    tokenizer_size: int
    image_token_id: int
    pad_token_id: int
    image_tokens_per_image: int
    resized_embeddings: bool
    copied: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        rows = [(f"params: {part}", f"{self.params[part]:,}") for part in PARTS]
        rows += [
            ("params: total", f"{sum(self.params.values()):,}"),
            ("vocab size (embedding rows)", f"{self.vocab_size:,}"),
            ("tokenizer size", f"{self.tokenizer_size:,}"),
            ("embeddings resized", str(self.resized_embeddings)),
            ("<image> token id", str(self.image_token_id)),
            ("pad token id", str(self.pad_token_id)),
            ("image tokens per image", str(self.image_tokens_per_image)),
        ]
        return rows


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(src: str, flag: str) -> Path:
    """A local directory as is; a hub id (``org/name``) fetched where a network exists."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BuildError(f"{flag} {src}: is a file, expected a checkpoint directory")
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", src) is not None and not src.startswith((".", "/"))
    if not looks_like_hub_id:
        raise BuildError(f"{flag} {src}: directory not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                src,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"],
            )
        )
    except Exception as exc:  # offline, unknown repo, auth...
        raise BuildError(
            f"{flag} {src}: not a local directory, and fetching it from the hub failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pass a local checkpoint directory."
        ) from exc


def _load_config(path: Path, flag: str):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise BuildError(f"{flag} {path}: no config.json; not a Hugging Face model directory")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise BuildError(f"{flag} {path}: cannot read config.json ({exc})") from exc


def load_vision_config(path: Path):
    """CLIP vision config plus the set of source prefixes that are not part of the vision tower."""
    from transformers import CLIPConfig, CLIPVisionConfig

    config = _load_config(path, "--vision")
    if isinstance(config, CLIPConfig):  # a full CLIPModel: keep the vision half
        return config.vision_config, ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
    if isinstance(config, CLIPVisionConfig):
        return config, ("visual_projection.",)  # CLIPVisionModelWithProjection's head is not used
    raise BuildError(
        f"--vision {path}: model_type {config.model_type!r} is not a CLIP checkpoint "
        "(expected 'clip' or 'clip_vision_model', e.g. openai/clip-vit-large-patch14-336)"
    )


def load_text_config(path: Path):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _load_config(path, "--llm")
    archs = config.architectures or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        archs and not any(a.endswith("ForCausalLM") for a in archs)
    ):
        raise BuildError(
            f"--llm {path}: model_type {config.model_type!r} (architectures {archs}) is not a causal LM; "
            "expected a Qwen2/Qwen2.5 *ForCausalLM checkpoint"
        )
    return config


def load_llm_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise BuildError(f"--llm {path}: cannot load its tokenizer ({exc})") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise BuildError(
            f"--llm {path}: the tokenizer has no chat template; use a chat/instruct checkpoint "
            "(e.g. Qwen2.5-3B-Instruct) whose tokenizer_config.json carries chat_template"
        )
    try:
        turn_end_token(tokenizer)
    except TemplateError as exc:
        raise BuildError(f"--llm {path}: {exc}") from exc
    return tokenizer


def load_image_processor(path: Path, image_size: int):
    """The checkpoint's own preprocessor config when it has one, else CLIP's defaults at its image size."""
    from transformers import CLIPImageProcessor
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if (path / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(path)
    else:
        processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
    crop = processor.crop_size if processor.do_center_crop else None
    if crop is None or (crop["height"], crop["width"]) != (image_size, image_size):
        raise BuildError(
            f"--vision {path}: preprocessor_config.json produces {crop} images but the vision tower expects "
            f"{image_size}x{image_size}; fix crop_size in preprocessor_config.json"
        )
    return processor


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def iter_checkpoint_tensors(path: Path, flag: str):
    """Yield ``(name, tensor)`` from every weight file of a checkpoint, one tensor at a time."""
    from safetensors import safe_open

    safetensors = sorted(path.glob("*.safetensors"))
    bins = sorted(p for p in path.glob("*.bin") if p.name.startswith("pytorch_model"))
    if safetensors:
        for file in safetensors:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    elif bins:
        for file in bins:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    else:
        raise BuildError(f"{flag} {path}: no *.safetensors or pytorch_model*.bin weight files")


def vision_name_map(name: str, dropped_prefixes: tuple[str, ...]) -> str | None:
    """``vision_model.X`` (CLIPModel, older CLIPVisionModel saves) or bare ``X`` (transformers 5 saves)
    goes to ``model.vision_tower.X``; the text half of a CLIPModel and legacy buffers are dropped."""
    if name.startswith(dropped_prefixes) or name.endswith(".position_ids"):
        return None
    return "model.vision_tower." + name.removeprefix("vision_model.")


def llm_name_map(name: str) -> str:
    """``model.X`` goes to ``model.language_model.X``; ``lm_head.*`` keeps its name."""
    if name.startswith("model."):
        return "model.language_model." + name.removeprefix("model.")
    return name


def _copy_weights(model, sources) -> tuple[dict[str, int], list[str]]:
    """Copy every source tensor into its mapped target; fail on unknown, mis-shaped or missing tensors."""
    target = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    written: set[str] = set()
    copied = {"vision": 0, "llm": 0}
    dropped: list[str] = []
    for kind, flag, path, name_map in sources:
        unexpected = []
        for name, tensor in iter_checkpoint_tensors(path, flag):
            dest = name_map(name)
            if dest is None:
                dropped.append(f"{kind}:{name}")
                continue
            if tied and dest == "lm_head.weight":
                dropped.append(f"{kind}:{name} (tied to embed_tokens)")
                continue
            if dest not in target:
                unexpected.append(name)
                continue
            if target[dest].shape != tensor.shape:
                raise BuildError(
                    f"{flag} {path}: tensor {name} has shape {tuple(tensor.shape)} but the composed model "
                    f"expects {tuple(target[dest].shape)} for {dest}; is config.json from the same checkpoint?"
                )
            with torch.no_grad():
                target[dest].copy_(tensor)
            written.add(dest)
            copied[kind] += 1
        if unexpected:
            raise BuildError(
                f"{flag} {path}: {len(unexpected)} tensors have no place in the LLaVA model, e.g. {unexpected[:5]}"
            )
    expected_fresh = {k for k in target if ".multi_modal_projector." in f".{k}"}
    if tied:
        expected_fresh.add("lm_head.weight")
    missing = sorted(set(target) - written - expected_fresh)
    if missing:
        raise BuildError(
            f"{len(missing)} weights of the composed model were not found in the checkpoints, e.g. {missing[:5]}; "
            "refusing to leave them randomly initialised"
        )
    return copied, dropped


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------


def compose_config(vision_config, text_config, image_token_id: int, pad_token_id: int):
    """The LlavaConfig for a CLIP + causal-LM pair (LLaVA-1.5 feature selection, 2-layer GELU MLP)."""
    from transformers import LlavaConfig

    text_config.pad_token_id = pad_token_id
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=patch_count(vision_config),
        projector_hidden_act="gelu",
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def patch_count(vision_config) -> int:
    """Patches per image, (image_size / patch_size)^2: the features a CLIP tower hands the projector once its
    CLS token is dropped. What one ``<image>`` must expand to (``data.encode.image_tokens_per_image``)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def add_image_token(tokenizer) -> int:
    """Add ``<image>`` as an additional special token (once) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def pad_token_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token or (PAD_TOKEN_FALLBACK if PAD_TOKEN_FALLBACK in tokenizer.get_vocab() else None)
    if pad is None:
        raise BuildError("the LLM tokenizer has no pad token and no <|endoftext|>; set pad_token in tokenizer_config.json")
    return tokenizer.convert_tokens_to_ids(pad)


def make_generation_config(tokenizer, pad_token_id: int):
    """Greedy by default; stops at the end-of-turn token (``<|im_end|>``) as well as at EOS."""
    from transformers import GenerationConfig

    stop = [tokenizer.convert_tokens_to_ids(turn_end_token(tokenizer))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    if pad_token_id not in stop:
        stop.append(pad_token_id)
    return GenerationConfig(eos_token_id=stop, pad_token_id=pad_token_id, do_sample=False)


def make_processor(image_processor, tokenizer, vision_config):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=VISION_FEATURE_SELECT,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=tokenizer.chat_template,
    )


def check_image_tokens(model, processor) -> int:
    """One ``<image>`` must expand to as many placeholder tokens as the tower yields features."""
    size = model.config.vision_config.image_size
    expected = patch_count(model.config.vision_config)
    prompt = render(processor.tokenizer, [{"role": "user", "content": IMAGE_TOKEN + "\nDescribe."}], add_generation_prompt=True)
    batch = processor(text=[prompt], images=[Image.new("RGB", (size, size), (127, 127, 127))], return_tensors="pt")
    n_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        pixels = batch["pixel_values"].to(model.dtype)
        n_features = model.model.get_image_features(pixel_values=pixels).pooler_output[0].shape[0]
    if not n_tokens == n_features == expected:
        raise BuildError(
            f"one <image> expands to {n_tokens} tokens, the vision tower yields {n_features} features, "
            f"expected (image_size/patch_size)^2 = {expected}; check patch_size / num_additional_image_tokens"
        )
    return n_tokens


def _dtype_of(name: str | None, text_config) -> torch.dtype:
    if name in (None, "auto"):
        dtype = getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def build_llava(vision: str, llm: str, out: str | os.PathLike | None = None, *, dtype: str | None = None, seed: int = 0):
    """Compose, check and (if ``out``) save. Returns ``(model, processor, BuildReport)``."""
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    vision_path = resolve_checkpoint(vision, "--vision")
    llm_path = resolve_checkpoint(llm, "--llm")
    vision_config, dropped_prefixes = load_vision_config(vision_path)
    text_config = load_text_config(llm_path)
    tokenizer = load_llm_tokenizer(llm_path)
    image_processor = load_image_processor(vision_path, vision_config.image_size)

    image_token_id = add_image_token(tokenizer)
    pad_id = pad_token_id_of(tokenizer)
    config = compose_config(vision_config, text_config, image_token_id, pad_id)
    torch_dtype = _dtype_of(dtype, text_config)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with no_init_weights():
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)

    copied, dropped = _copy_weights(
        model,
        [
            ("vision", "--vision", vision_path, lambda n: vision_name_map(n, dropped_prefixes)),
            ("llm", "--llm", llm_path, llm_name_map),
        ],
    )
    torch.manual_seed(seed)
    for module in model.model.multi_modal_projector.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()  # nn.Linear's default init, as LLaVA's projector uses
    model.tie_weights()

    rows = model.get_input_embeddings().weight.shape[0]
    resized = len(tokenizer) > rows
    if resized:  # Qwen2.5 has spare rows; only a full vocabulary needs to grow
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.generation_config = make_generation_config(tokenizer, pad_id)
    model.config.dtype = torch_dtype
    model.eval()

    processor = make_processor(image_processor, tokenizer, vision_config)
    n_image_tokens = check_image_tokens(model, processor)
    report = BuildReport(
        out=Path(out) if out else None,
        params=dict(count_params(model)),
        vocab_size=model.get_input_embeddings().weight.shape[0],
        tokenizer_size=len(tokenizer),
        image_token_id=image_token_id,
        pad_token_id=pad_id,
        image_tokens_per_image=n_image_tokens,
        resized_embeddings=resized,
        copied=copied,
        dropped=dropped,
    )
    if out is not None:
        save_model_dir(model, processor, out)
        (Path(out) / "llava_loop_build.json").write_text(
            json.dumps({"vision": str(vision), "llm": str(llm), "seed": seed, **{k: v for k, v in report.__dict__.items() if k not in ("out", "dropped")}}, indent=2)
        )
    return model, processor, report


def save_model_dir(model, processor, out: str | os.PathLike) -> None:
    """Model (safetensors), generation config and processor into one plain HF directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
