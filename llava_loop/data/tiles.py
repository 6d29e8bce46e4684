"""Tiled images (LLaVA-NeXT, OneVision): how many placeholders an image fills, and the tiles the tower sees.

A tiled processor cuts each image into a base view plus tiles on the best-fitting grid of its
``image_grid_pinpoints``, so an image's placeholder count depends on its size (``_get_number_of_features``, the
processor's own formula, which the model's unpadding matches feature for feature). OneVision shows the tiles only
for a sample with one image; a sample with several sees each at base resolution (one view, one newline), as its
processor and ``get_image_features(batch_num_images=...)`` do; that view is the image padded to a square, not the
squashed base view of a tiled one.

The model takes every sample's tiles concatenated, ``(tiles, 3, side, side)``, with ``image_sizes`` (height,
width) per image: it recomputes each image's tile count from its size, so nothing is padded.
"""

from __future__ import annotations

import torch
from PIL import Image

from .images import processed_size


class Tiler:
    def __init__(self, processor):
        self.processor = processor
        self.image_processor = processor.image_processor
        self.side, _ = processed_size(self.image_processor)
        self.onevision = hasattr(processor, "vision_aspect_ratio")  # LlavaOnevisionProcessor's anyres_max_N
        self.drops_cls = processor.vision_feature_select_strategy == "default"

    @classmethod
    def of(cls, processor) -> Tiler | None:
        """A Tiler for a tiled processor, None for a fixed-size (``llava``) one."""
        return cls(processor) if getattr(processor.image_processor, "image_grid_pinpoints", None) else None

    def describe(self) -> str:
        grids = self.image_processor.image_grid_pinpoints
        kind = f"OneVision, {self.processor.vision_aspect_ratio}" if self.onevision else "LLaVA-NeXT"
        return f"{kind}: {self.side} px tiles on {len(grids)} grids, plus a base view"

    def tiled(self, n_images: int) -> bool:
        """Whether the images of a sample with ``n_images`` images are tiled (OneVision: only a lone image)."""
        return n_images == 1 or not self.onevision

    def tokens(self, height: int, width: int, n_images: int) -> int:
        """Placeholders one image of ``height`` x ``width`` fills in a sample with ``n_images`` images."""
        if self.tiled(n_images):
            n = self.processor._get_number_of_features(height, width, self.side, self.side)
        else:  # the base view and one newline
            n = self.processor.num_image_tokens + 1
        return n - 1 if self.drops_cls else n

    def views(self, images: list[Image.Image]) -> torch.Tensor:
        """One sample's images -> ``(views, 3, side, side)``, as the processor cuts them: each image's base view
        and then its tiles, row by row, image after image; OneVision's several images one (square) view each."""
        if self.tiled(len(images)):
            return torch.cat(
                [self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0] for image in images]
            )
        return self.image_processor(images=[images], return_tensors="pt")["pixel_values"][:, 0]

    def view_count(self, width: int, height: int) -> int:
        """How many views the tower encodes for a lone image of this size, as the processor cuts it."""
        return len(self.views([Image.new("RGB", (width, height))]))
