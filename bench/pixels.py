"""Pixels of transformers' two image-processor backends, PIL and torchvision, at the real towers' settings.

llava_loop trains with PIL's preprocessing (its fast path computes PIL's pixels; runtime.load_model asks for the
PIL backend). Installing torchvision (lmms-eval pulls it) makes transformers pick its torchvision backend by
default, so lmms-eval and plain-HF users of an export may see other pixels. This measures how far apart they are,
in 8-bit grey levels after normalisation, on synthetic photo-like images (smooth gradients, edges, noise) at
common dataset sizes. Needs torchvision: run it in the lmms venv (see .ci/run).

    python bench/pixels.py
"""

from __future__ import annotations

import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

TOWERS = {
    "CLIP ViT-L/14-336 (shortest edge 336, centre crop)": ("clip", 336, 14),
    "SigLIP so400m-384 (384x384)": ("siglip", 384, 14),
}
SIZES = ((336, 336), (384, 384), (500, 375), (640, 480), (1024, 768), (427, 640))


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1) * 90 + 128
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        draw.ellipse(
            (x0, y0, x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))),
            fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
        )
    return image


def main() -> None:
    from transformers import AutoImageProcessor

    from llava_loop.demo.families import save_vision

    print(f"# Pixels: PIL vs torchvision image-processor backends ({date.today()}, {machine()})\n")
    print(
        "| tower preprocessing | image size | max gap (grey levels) | mean gap (grey levels) "
        "| values > 0.5 level apart |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, size, patch) in TOWERS.items():
            path = save_vision(
                Path(tmp) / family, family, image_size=size, patch_size=patch, hidden=32, layers=1, heads=2
            )
            pil = AutoImageProcessor.from_pretrained(path, backend="pil")
            vision = AutoImageProcessor.from_pretrained(path, backend="torchvision")
            level = 1 / 255 / np.array(pil.image_std)[:, None, None]
            for i, (w, h) in enumerate(SIZES):
                image = photo_like(w, h, seed=i)
                a, b = (p(images=image, return_tensors="np")["pixel_values"][0] for p in (pil, vision))
                gap = np.abs(a - b) / level
                print(f"| {name} | {w}x{h} | {gap.max():.2f} | {gap.mean():.4f} | {(gap > 0.5).mean():.2%} |")


if __name__ == "__main__":
    main()
