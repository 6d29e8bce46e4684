"""Vision towers LLaVA can use, and what each family means for the composed model.

A family fixes three things the LLaVA config, the processor and the weight copy must agree on:

| family | checkpoints                                        | CLS token | feature select | unused head          |
|--------|----------------------------------------------------|-----------|----------------|----------------------|
| clip   | CLIPModel, CLIPVisionModel(+WithProjection)        | yes       | default (drop) | visual_projection    |
| siglip | SiglipModel, SiglipVisionModel (and SigLIP2 fixed) | no        | full           | attention-pool head  |

The hub's fixed-resolution SigLIP2 repos (e.g. google/siglip2-so400m-patch14-384) use the SigLIP architecture;
SigLIP2 NaFlex (model_type ``siglip2``) takes variable-size patch sequences that LLaVA's fixed
``image_seq_length`` cannot express, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data.images import processed_size
from .errors import BuildError
from .folders import RemoteCodeRefused, load


@dataclass(frozen=True)
class VisionFamily:
    name: str
    model_type: str  # the dual encoder (CLIPModel, SiglipModel)
    vision_model_type: str  # the vision half alone
    text_parts: tuple[str, ...]  # tensors of a dual encoder that are not the vision tower
    unused_heads: tuple[str, ...]  # vision-model tensors LLaVA never uses (pooling / projection heads)
    has_cls: bool
    config_overrides: dict = field(default_factory=dict)  # applied to the composed vision config

    @property
    def select_strategy(self) -> str:
        """LLaVA's ``vision_feature_select_strategy``: ``default`` drops the CLS feature, ``full`` keeps all."""
        return "default" if self.has_cls else "full"


FAMILIES = (
    VisionFamily(
        "clip",
        "clip",
        "clip_vision_model",
        ("text_model.", "text_projection.", "logit_scale"),
        ("visual_projection.",),
        has_cls=True,
    ),
    # LLaVA-OneVision style: the attention-pooling head is dropped from the config, so it is neither stored nor run
    VisionFamily(
        "siglip",
        "siglip",
        "siglip_vision_model",
        ("text_model.", "logit_scale", "logit_bias"),
        ("head.",),
        has_cls=False,
        config_overrides={"vision_use_head": False},
    ),
)
CLIP, SIGLIP = FAMILIES
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")


@dataclass
class VisionTower:
    path: Path
    family: VisionFamily
    config: object  # the vision config that goes into LlavaConfig.vision_config
    image_processor: object
    processor_source: str  # where the image processor came from, for the build table

    @property
    def features_per_image(self) -> int:
        """Features the tower hands the projector per image: its patch grid (no CLS under either strategy)."""
        height, width = processed_size(self.image_processor)
        return (height // self.config.patch_size) * (width // self.config.patch_size)

    def target_name(self, name: str) -> str | None:
        """Where a checkpoint tensor goes in ``LlavaForConditionalGeneration``, or None when LLaVA does not use it.
        ``vision_model.X`` (dual encoders, older vision-only saves) and bare ``X`` (transformers 5 saves) alike."""
        if name.startswith(self.family.text_parts) or name.endswith(".position_ids"):
            return None
        tail = name.removeprefix("vision_model.")
        if tail.startswith(self.family.unused_heads):
            return None
        return "model.vision_tower." + tail


def family_of(config, path: Path) -> tuple[VisionFamily, object]:
    """The tower's family and its vision config (the vision half of a dual encoder)."""
    if config.model_type in NAFLEX_MODEL_TYPES:
        raise BuildError(
            f"--vision {path}: model_type {config.model_type!r} is SigLIP2 NaFlex (variable resolution), which "
            "llava_loop does not support; use a fixed-resolution SigLIP2 checkpoint such as "
            "google/siglip2-so400m-patch14-384 (it uses the SigLIP architecture)"
        )
    for family in FAMILIES:
        if config.model_type == family.model_type:
            return family, config.vision_config
        if config.model_type == family.vision_model_type:
            return family, config
    known = ", ".join(f"{f.model_type!r}/{f.vision_model_type!r}" for f in FAMILIES)
    raise BuildError(
        f"--vision {path}: model_type {config.model_type!r} is not a supported vision tower (expected one of {known}, "
        "e.g. openai/clip-vit-large-patch14-336 or google/siglip-so400m-patch14-384)"
    )


def load_image_processor(path: Path, family: VisionFamily, vision_config) -> tuple[object, str]:
    """The tower's own image processor (``preprocessor_config.json``, legacy feature-extractor files included),
    else its family's processor class with that class's defaults at the tower's resolution."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    # from its module: transformers 5.17's top-level AutoImageProcessor is a torchvision-only placeholder where
    # torchvision is missing (fixed by 5.24), and the GPU machine has no torchvision
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    if (path / "preprocessor_config.json").is_file():
        try:
            return load(AutoImageProcessor, path, "--vision"), "preprocessor_config.json"
        except RemoteCodeRefused:
            raise
        except Exception as exc:
            raise BuildError(f"--vision {path}: cannot read preprocessor_config.json ({exc})") from exc
    side = vision_config.image_size
    if family.name == "clip":
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    else:
        processor = SiglipImageProcessor(size={"height": side, "width": side})
    return processor, f"{type(processor).__name__.removesuffix('Pil')} defaults (no preprocessor_config.json)"


def load_vision_tower(path: Path, config) -> VisionTower:
    family, vision_config = family_of(config, path)
    for key, value in family.config_overrides.items():
        setattr(vision_config, key, value)
    image_processor, source = load_image_processor(path, family, vision_config)
    size = processed_size(image_processor, where=f"--vision {path}: preprocessor_config.json")
    if size != (vision_config.image_size, vision_config.image_size):
        raise BuildError(
            f"--vision {path}: the image processor produces {size[0]}x{size[1]} images but the tower expects "
            f"{vision_config.image_size}x{vision_config.image_size}; fix size/crop_size in preprocessor_config.json"
        )
    return VisionTower(path, family, vision_config, image_processor, source)
