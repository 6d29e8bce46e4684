"""The AnyRes demo's synthetic "fine print" dataset: wide images with one small patch of fine pattern.

Each image is three tower sides wide and one high: a noisy background with one square patch, a fifth of the
image's height, at a random place, filled with one of four patterns of 2-pixel detail (vertical stripes,
horizontal stripes, checks) or with plain grey of the same mean brightness. A base-resolution model (LLaVA-1.5's
``pad``: the image padded square, then resized to the tower's side) sees it at a third of its size, where 2-pixel
detail averages out to that grey; a LLaVA-NeXT model also sees the image on its 1x3 grid of full-resolution tiles.
The question asks which pattern the patch shows. Images are PNG: JPEG would blur the very detail the task is about.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from ..template import IMAGE_TOKEN

PATTERNS = ("vertical", "horizontal", "checks", "plain")
QUESTION = "Which pattern is in the patch?"
WIDTH_IN_SIDES = 3  # the widest grid of LLaVA-NeXT's pattern (1x3) holds the whole image at full resolution
DARK, LIGHT = 40, 230


def answer(pattern: str) -> str:
    return f"{pattern} ."


def shade(pattern: str, x: int, y: int) -> int:
    """The patch's grey level at pixel (x, y): 2-pixel stripes or checks, or their mean. Each 4-pixel period runs
    dark, light, light, dark, so a patch of whole periods is symmetric and has the same mean in every pattern:
    blurred, no pattern leaves a gradient or a brightness that gives it away."""
    light_x, light_y = x % 4 in (1, 2), y % 4 in (1, 2)
    on = {"vertical": light_x, "horizontal": light_y, "checks": light_x != light_y}.get(pattern)
    return (DARK + LIGHT) // 2 if on is None else (LIGHT if on else DARK)


def draw_patch_image(side: int, pattern: str, rng: random.Random) -> Image.Image:
    width, height = WIDTH_IN_SIDES * side, side
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")  # seeded, unlike
    image = Image.blend(Image.new("RGB", (width, height), (90, 90, 100)), noise, 0.1)  # Image.effect_noise
    patch = max(4, round(side / 5) // 4 * 4)  # whole periods of the 4-pixel pattern
    left, top = rng.randrange(2, width - patch - 2), rng.randrange(2, height - patch - 2)
    tile = Image.new("L", (patch, patch))
    tile.putdata([shade(pattern, x, y) for y in range(patch) for x in range(patch)])
    image.paste(tile.convert("RGB"), (left, top))
    return image


def write_patterns(
    out: str | Path, n: int, *, seed: int = 0, side: int = 64, prefix: str = "fine", json_name: str = "chat.json"
) -> Path:
    """Write ``out/<json_name>`` and ``out/images/*.png``; returns the JSON path."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        pattern = rng.choice(PATTERNS)
        name = f"{prefix}_{i:06d}"
        draw_patch_image(side, pattern, rng).save(images / f"{name}.png")
        conversations = [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"},
            {"from": "gpt", "value": answer(pattern)},
        ]
        records.append({"id": name, "image": f"{name}.png", "conversations": conversations})
    path = out / json_name
    path.write_text(json.dumps(records, indent=1))
    return path
