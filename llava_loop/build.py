"""Compose a LLaVA model from a vision tower (CLIP or SigLIP) and a chat LLM (any ``*ForCausalLM``).

The result is one directory that plain ``transformers`` loads: ``LlavaForConditionalGeneration``
weights (safetensors), a ``LlavaProcessor`` (the LLM's tokenizer and chat template plus the tower's own
image processor) and a generation config that stops at the LLM's end-of-turn and end-of-sequence tokens.
``arch="llava-next"`` / ``"llava-onevision"`` write ``LlavaNextForConditionalGeneration`` /
``LlavaOnevisionForConditionalGeneration`` with their processors instead: the same towers, images tiled
(``anyres.py``).
What each tower family implies lives in ``vision_tower.py``; the LLM's tokens in ``llm.py``.

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

from .anyres import Tiling, tiling_for
from .data.images import processed_size
from .errors import BuildError
from .folders import RemoteCodeRefused, load
from .llm import choose_pad_token, fit_embeddings, generation_config, load_text_config, load_tokenizer
from .parts import PARTS, PROJECTOR, count_params, part_of
from .template import IMAGE_TOKEN, VIDEO_TOKEN, processor_chat_template, render, turn_end_token
from .vision_tower import CLIP, VisionFamily, VisionTower, load_vision_tower

VISION_FEATURE_LAYER = -2  # LLaVA-1.5: features from the penultimate layer


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
    vision_family: str = ""
    llm_model_type: str = ""
    feature_layer: int = VISION_FEATURE_LAYER
    image_processor: str = ""
    pad_token: str = ""
    pad_choice: str = ""
    stop_tokens: list[str] = field(default_factory=list)
    embedding_rows_before: int = 0
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        rows = [(f"params: {part}", f"{self.params[part]:,}") for part in PARTS]
        grown = (
            f"{self.embedding_rows_before:,} -> {self.vocab_size:,} rows, new rows = mean of the old"
            if self.resized_embeddings
            else "no (spare rows hold the new tokens)"
        )
        rows += [
            ("params: total", f"{sum(self.params.values()):,}"),
            ("vision tower", f"{self.vision_family} (feature layer {self.feature_layer})"),
            ("image processor", self.image_processor),
            ("LLM", self.llm_model_type),
            ("vocab size (embedding rows)", f"{self.vocab_size:,}"),
            ("tokenizer size", f"{self.tokenizer_size:,}"),
            ("embeddings resized", grown),
            ("<image> token id", str(self.image_token_id)),
            ("pad token id", f"{self.pad_token_id} {self.pad_token}"),
            ("pad token is", self.pad_choice),
            ("stops at", " ".join(self.stop_tokens)),
            ("image tokens per image", str(self.image_tokens_per_image)),
        ]
        rows += [("note", note) for note in self.notes]
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
        return load(AutoConfig, path, flag)
    except RemoteCodeRefused:
        raise
    except Exception as exc:
        raise BuildError(f"{flag} {path}: cannot read config.json ({exc})") from exc


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
            yield from load_bin_weights(file, flag).items()
    else:
        raise BuildError(f"{flag} {path}: no *.safetensors or pytorch_model*.bin weight files")


def load_bin_weights(file: Path, flag: str) -> dict:
    """A pickle-based ``.bin`` weight file, tensors only (``weights_only``: nothing else is unpickled). One whose
    pickle stream names other globals (code that unpickling would run) is refused by name."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except Exception:
            unsafe = []
        raise BuildError(
            f"{flag} {file}: refused to load: its pickle stream references "
            f"{unsafe or 'objects other than tensors'}, code that loading it would run, and weight files "
            "hold only tensors. Use the checkpoint's .safetensors files, or get the .bin from a source "
            "you trust and convert it to safetensors"
        ) from None
    except Exception as exc:
        raise BuildError(
            f"{flag} {file}: cannot load it as tensors ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); fetch it again, or use the checkpoint's .safetensors"
        ) from None


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
    expected_fresh = {k for k in target if part_of(k) == PROJECTOR}  # the projector (and image_newline) start fresh
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


def compose_config(
    vision_config,
    text_config,
    image_token_id: int,
    pad_token_id: int,
    *,
    family: VisionFamily = CLIP,
    feature_layer: int = VISION_FEATURE_LAYER,
    tiling: Tiling | None = None,
    video_token_id: int | None = None,
):
    """The LlavaConfig for a vision tower + causal-LM pair (2-layer GELU MLP projector, LLaVA-1.5); with a
    ``tiling``, the LlavaNextConfig or LlavaOnevisionConfig of the same pair."""
    from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

    text_config.pad_token_id = pad_token_id
    # the LLM's remote-code classes (auto_map) are not in the composed directory, which plain transformers loads
    text_config.__dict__.pop("auto_map", None)
    shared = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=family.select_strategy,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    base_view_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    if tiling is None:
        return LlavaConfig(**shared, image_seq_length=base_view_tokens)
    if tiling.arch == "llava-next":
        return LlavaNextConfig(**shared, image_grid_pinpoints=tiling.pinpoints, image_seq_length=base_view_tokens)
    return LlavaOnevisionConfig(
        **shared,
        image_grid_pinpoints=tiling.pinpoints,
        vision_aspect_ratio=tiling.vision_aspect_ratio,
        video_token_index=video_token_id,
    )


def check_feature_layer(layer: int, vision_config) -> int:
    n = vision_config.num_hidden_layers
    if not -(n + 1) <= layer <= n:
        raise BuildError(
            f"--feature-layer {layer}: the vision tower has {n} layers, so the layer must lie in "
            f"[-{n + 1}, {n}] (hidden states 0..{n}; -2 = the penultimate layer, as LLaVA-1.5)"
        )
    return layer


def add_image_token(tokenizer, token: str = IMAGE_TOKEN) -> int:
    """Add ``<image>`` (or OneVision's ``<video>``) as an additional special token (once) and return its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(token)


TILED_IMAGE_PROCESSOR_KEYS = (
    "size", "crop_size", "do_center_crop", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_convert_rgb",
)  # fmt: skip


def tiled_image_processor(tower: VisionTower, tiling: Tiling):
    """LLaVA-NeXT's / OneVision's image processor, preprocessing each tile as the tower's own processor does."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    own = tower.image_processor
    kwargs = {key: getattr(own, key) for key in TILED_IMAGE_PROCESSOR_KEYS if getattr(own, key, None) is not None}
    kwargs = {key: dict(value) if hasattr(value, "keys") else value for key, value in kwargs.items()}
    # the tile side is crop_size's, cropped or not (else transformers' 224 px default), and nothing else crops
    kwargs.update(
        do_center_crop=bool(kwargs.get("do_center_crop")), crop_size={"height": tiling.side, "width": tiling.side}
    )
    cls = LlavaNextImageProcessorPil if tiling.arch == "llava-next" else LlavaOnevisionImageProcessorPil
    return cls(**kwargs, image_grid_pinpoints=tiling.pinpoints, do_pad=True)


def video_processor(tower: VisionTower, tiling: Tiling):
    """OneVision's video processor for this tower: each frame resized to the tower's square input (no crop, as
    LLaVA-OneVision's video frames) and normalised as the tower's own processor normalises images."""
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    own = tower.image_processor
    kwargs = {key: getattr(own, key) for key in ("image_mean", "image_std", "resample") if getattr(own, key, None)}
    return LlavaOnevisionVideoProcessor(**kwargs, size={"height": tiling.side, "width": tiling.side})


def make_processor(tower: VisionTower, tokenizer, tiling: Tiling | None = None):
    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor, LlavaProcessor

    if tiling is not None and tiling.arch == "llava-next":
        return LlavaNextProcessor(
            image_processor=tiled_image_processor(tower, tiling),
            tokenizer=tokenizer,
            patch_size=tower.config.patch_size,
            vision_feature_select_strategy=tower.family.select_strategy,
            num_additional_image_tokens=int(tower.family.has_cls),
            chat_template=tokenizer.chat_template,
        )
    if tiling is not None:
        return LlavaOnevisionProcessor(
            image_processor=tiled_image_processor(tower, tiling),
            tokenizer=tokenizer,
            video_processor=video_processor(tower, tiling),
            # counted with CLIP's CLS, which the processor subtracts again under "default" (as LlavaProcessor)
            num_image_tokens=tower.features_per_image + int(tower.family.has_cls),
            vision_feature_select_strategy=tower.family.select_strategy,
            chat_template=tokenizer.chat_template,
            vision_aspect_ratio=tiling.vision_aspect_ratio,
        )
    return LlavaProcessor(
        image_processor=tower.image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=tower.family.select_strategy,
        num_additional_image_tokens=int(tower.family.has_cls),  # CLIP's CLS, dropped again by "default"
        chat_template=tokenizer.chat_template,
    )


def check_image_tokens(model, processor, expected: int, tiling: Tiling | None = None) -> None:
    """One ``<image>`` must expand to as many placeholder tokens as the tower yields features: its patch grid
    (``expected``), or, tiled, more (checked on an image twice as wide as tall: a base view, two tiles, padding
    removed, row ends)."""
    size = model.config.vision_config.image_size
    prompt = render(
        processor.tokenizer, [{"role": "user", "content": IMAGE_TOKEN + "\nDescribe."}], add_generation_prompt=True
    )
    image = Image.new("RGB", (2 * size if tiling else size, size), (127, 127, 127))
    batch = processor(text=[prompt], images=[image], return_tensors="pt")
    n_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        pixels = batch["pixel_values"].to(model.dtype)
        sizes = {"image_sizes": batch["image_sizes"]} if tiling else {}
        n_features = model.model.get_image_features(pixel_values=pixels, **sizes).pooler_output[0].shape[0]
    if tiling and not n_tokens == n_features > expected:
        raise BuildError(
            f"a {2 * size}x{size} image expands to {n_tokens} tokens and the model yields {n_features} features for "
            f"it, expected equal counts above the base view's {expected}; check the image processor's tile size"
        )
    if not tiling and not n_tokens == n_features == expected:
        raise BuildError(
            f"one <image> expands to {n_tokens} tokens, the vision tower yields {n_features} features, "
            f"expected its patch grid, {expected}; check patch_size and the image processor's size"
        )


def _dtype_of(name: str | None, text_config) -> torch.dtype:
    if name in (None, "auto"):
        dtype = getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32
    return {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }[name]


def build_notes(text_config) -> list[str]:
    """Things about the pair a user should know before training it."""
    notes = []
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap:
        notes.append(
            f"the LLM's final_logit_softcapping ({softcap}) is not applied by LlavaForConditionalGeneration; "
            "training and inference both see uncapped logits (greedy decoding is unaffected)"
        )
    return notes


def build_llava(
    vision: str,
    llm: str,
    out: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    seed: int = 0,
    feature_layer: int = VISION_FEATURE_LAYER,
    chat_template: str | None = None,
    arch: str = "llava",
    grid_pinpoints: str | None = None,
    max_tiles: int = 0,
):
    """Compose, check and (if ``out``) save. Returns ``(model, processor, BuildReport)``.

    ``chat_template``: a Jinja file or a built-in name (``chatml``, ``llama3``, ``vicuna``) for an LLM whose tokenizer
    has none, or to replace the one it has. ``arch``, ``grid_pinpoints``, ``max_tiles``: see ``anyres.tiling_for``."""
    from transformers.initialization import no_init_weights

    vision_path = resolve_checkpoint(vision, "--vision")
    llm_path = resolve_checkpoint(llm, "--llm")
    tower = load_vision_tower(vision_path, _load_config(vision_path, "--vision"))
    text_config = load_text_config(llm_path, _load_config(llm_path, "--llm"))
    tokenizer = load_tokenizer(llm_path, chat_template)

    image_token_id = add_image_token(tokenizer)
    tiling, video_token_id = prepare_tiling(arch, tower, tokenizer, grid_pinpoints, max_tiles)
    pad_token, pad_choice = choose_pad_token(tokenizer)
    pad_id = tokenizer.convert_tokens_to_ids(pad_token)
    rows = text_config.vocab_size  # a new <pad> has no row until the embeddings grow: set it after that
    config = compose_config(
        tower.config,
        text_config,
        image_token_id,
        pad_id if pad_id < rows else None,
        family=tower.family,
        feature_layer=check_feature_layer(feature_layer, tower.config),
        tiling=tiling,
        video_token_id=video_token_id,
    )
    torch_dtype = _dtype_of(dtype, text_config)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with no_init_weights():
            model = model_class(arch)(config)
    finally:
        torch.set_default_dtype(previous)

    copied, dropped = _copy_weights(
        model,
        [
            ("vision", "--vision", vision_path, tower.target_name),
            ("llm", "--llm", llm_path, llm_name_map),
        ],
    )
    torch.manual_seed(seed)
    for module in model.model.multi_modal_projector.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()  # nn.Linear's default init, as LLaVA's projector uses
    init_image_newline(model)
    model.tie_weights()

    rows_before, rows_after = fit_embeddings(model, len(tokenizer))
    model.config.text_config.pad_token_id = pad_id
    model.generation_config = generation_config(tokenizer, llm_path, text_config)
    model.config.dtype = torch_dtype
    model.eval()

    processor = make_processor(tower, tokenizer, tiling)
    check_image_tokens(model, processor, tower.features_per_image, tiling)
    n_image_tokens = tower.features_per_image
    report = BuildReport(
        out=Path(out) if out else None,
        params=dict(count_params(model)),
        vocab_size=rows_after,
        tokenizer_size=len(tokenizer),
        image_token_id=image_token_id,
        pad_token_id=pad_id,
        image_tokens_per_image=n_image_tokens,
        resized_embeddings=rows_after != rows_before,
        copied=copied,
        dropped=dropped,
        vision_family=tower.family.name,
        llm_model_type=text_config.model_type,
        feature_layer=feature_layer,
        image_processor=tower.processor_source,
        pad_token=pad_token,
        pad_choice=pad_choice,
        stop_tokens=tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id),
        embedding_rows_before=rows_before,
        notes=build_notes(text_config) + tiling_notes(tiling),
    )
    if out is not None:
        save_model_dir(model, processor, out)
        write_build_record(out, report, {"vision": str(vision), "llm": str(llm), "seed": seed}, tiling)
    return model, processor, report


def upgrade_llava(
    stage1: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    arch: str = "llava-next",
    grid_pinpoints: str | None = None,
    max_tiles: int = 0,
    seed: int = 0,
):
    """A trained base-resolution model (a composed or exported ``llava`` directory) as a tiled one, the LLaVA-NeXT
    recipe: stage 1 at base resolution, stage 2 with tiles. Towers, projector, tokenizer and generation config are
    kept exactly; ``image_newline`` starts fresh from ``seed``. Returns ``(model, processor, BuildReport)``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    from .vision_tower import family_of

    path = Path(stage1)
    if not (path / "config.json").is_file():
        raise BuildError(f"--from {path}: no config.json; pass a directory from `llava-loop build` or `export`")
    if arch == "llava":
        raise BuildError(f"--from {path}: it is a llava model already; choose --arch llava-next or llava-onevision")
    source_type = json.loads((path / "config.json").read_text()).get("model_type")
    if source_type != "llava":  # transformers would load a tiled model's weights into Llava, dropping image_newline
        raise BuildError(
            f"--from {path}: a {source_type} model; build --from upgrades a base-resolution llava model (stage 1's "
            "export), and a tiled one's trained image_newline would be replaced by a fresh one. Train it as it is, "
            "or upgrade the llava model it was made from"
        )
    base = LlavaForConditionalGeneration.from_pretrained(path)
    old = load(AutoProcessor, path, "--from")
    family, vision_config = family_of(base.config.vision_config, path)
    tower = VisionTower(path, family, vision_config, old.image_processor, "--from " + str(path))
    tokenizer = old.tokenizer
    tiling, video_token_id = prepare_tiling(arch, tower, tokenizer, grid_pinpoints, max_tiles)
    text_config = base.config.text_config
    config = compose_config(
        vision_config,
        text_config,
        base.config.image_token_id,
        text_config.pad_token_id,
        family=family,
        feature_layer=base.config.vision_feature_layer,
        tiling=tiling,
        video_token_id=video_token_id,
    )
    with no_init_weights():
        model = model_class(arch)(config).to(base.dtype)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or set(missing) - {"model.image_newline"}:
        raise BuildError(f"--from {path}: weights do not map onto {arch}: missing {missing}, unexpected {unexpected}")
    torch.manual_seed(seed)
    init_image_newline(model)
    model.tie_weights()
    rows_before, rows_after = fit_embeddings(model, len(tokenizer))
    model.generation_config = base.generation_config  # from_pretrained read generation_config.json
    model.config.dtype = base.dtype
    model.eval()
    processor = make_processor(tower, tokenizer, tiling)
    check_image_tokens(model, processor, tower.features_per_image, tiling)
    report = BuildReport(
        out=Path(out) if out else None,
        params=dict(count_params(model)),
        vocab_size=rows_after,
        tokenizer_size=len(tokenizer),
        image_token_id=base.config.image_token_id,
        pad_token_id=text_config.pad_token_id,
        image_tokens_per_image=tower.features_per_image,
        resized_embeddings=rows_after != rows_before,
        vision_family=family.name,
        llm_model_type=text_config.model_type,
        feature_layer=base.config.vision_feature_layer,
        image_processor=f"{type(old.image_processor).__name__} of {path}, tiled",
        stop_tokens=tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id),
        embedding_rows_before=rows_before,
        notes=[f"upgraded from {path}: towers and projector kept"] + tiling_notes(tiling),
    )
    if out is not None:
        save_model_dir(model, processor, out)
        write_build_record(out, report, {"from": str(path), "seed": seed}, tiling)
    return model, processor, report


def write_build_record(out, report: BuildReport, sources: dict, tiling: Tiling | None) -> None:
    """``llava_loop_build.json``: what the build was made from and its report (a plain llava build's keys are
    exactly as before tiling existed: its bytes are pinned)."""
    record = {**sources, **{k: v for k, v in report.__dict__.items() if k not in ("out", "dropped")}}
    if tiling is not None:
        record.update(arch=tiling.arch, grid_pinpoints=tiling.pinpoints, max_tiles=tiling.max_tiles)
    (Path(out) / "llava_loop_build.json").write_text(json.dumps(record, indent=2))


def prepare_tiling(arch: str, tower: VisionTower, tokenizer, grids: str | None, max_tiles: int):
    """``(tiling, video token id)`` for ``arch`` at the tower's input size (both None for llava); OneVision's
    processor needs torchvision, and its config and processor name a ``<video>`` token, added here."""
    tiling = tiling_for(arch, processed_size(tower.image_processor)[0], grids=grids, max_tiles=max_tiles)
    if arch != "llava-onevision":
        return tiling, None
    require_video_processors()
    return tiling, add_image_token(tokenizer, VIDEO_TOKEN)


def require_video_processors() -> None:
    """transformers' OneVision processor cannot be built, saved or loaded without its video processor, which needs
    torchvision (without it transformers fails deep inside with an AttributeError)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        raise BuildError(
            "--arch llava-onevision: transformers' OneVision processor needs torchvision (for its video processor), "
            "which is not installed; install the torchvision that matches your torch (pip install torchvision), or "
            "use --arch llava-next"
        )


def model_class(arch: str):
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    return {
        "llava": LlavaForConditionalGeneration,
        "llava-next": LlavaNextForConditionalGeneration,
        "llava-onevision": LlavaOnevisionForConditionalGeneration,
    }[arch]


def init_image_newline(model) -> None:
    """The row-end feature of tiled images, drawn as transformers' own init draws it, from the build's seed (its
    constructor drew it from whatever the global generator held)."""
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        with torch.no_grad():
            newline.normal_(0.0, 1 / model.config.text_config.hidden_size**0.5)


def tiling_notes(tiling: Tiling | None) -> list[str]:
    if tiling is None:
        return []
    return [f"{tiling.arch}: {tiling.describe()}; image tokens per image vary with its size"]


def save_model_dir(model, processor, out: str | os.PathLike) -> None:
    """Model (safetensors), generation config and processor into one plain HF directory. Its chat template takes
    HF content lists in the training layout (also when exporting a model built before it did), and its tokenizer's
    ``eos_token`` is the token that ends an assistant turn: tools that stop at the tokenizer's eos alone (lmms-eval's
    ``llava_hf``) stop where the model was trained to (Gemma's ``<end_of_turn>``, not ``<eos>``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    processor.chat_template = tokenizer.chat_template = processor_chat_template(tokenizer.chat_template)
    tokenizer.eos_token = turn_end_token(tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
