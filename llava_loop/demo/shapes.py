"""The demo's synthetic "shapes" dataset, in the exact LLaVA-CC3M-Pretrain-595K layout, and its scorer.

Each image shows one coloured shape at one of five positions on a noisy background; its caption reads
like ``a red circle in the top left .``. Prompts come from a small pool of pretrain-style instructions
with ``<image>`` at the start or at the end of the human turn, as in the real data. Optional extra
question/answer rounds make multi-turn, mixed-length conversations. An optional two-image task ("which image
has the red circle?") makes multi-image records whose answer depends on telling the images apart.
``attribute_accuracy`` is the
extra scorer the demo hands to ``llava_loop.evaluate``: per-attribute accuracy of generated captions.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..template import IMAGE_TOKEN

COLORS = {
    "red": (220, 35, 35),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 55, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {  # name -> centre as a fraction of the image side
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
ATTRIBUTES = ("color", "shape", "position")

PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption for this picture.",
    "What does the image show? Answer in a few words.",
    "Give a one-line description of the picture.",
    "Summarize the visual content in a short phrase.",
    "Caption the image concisely.",
)
FOLLOW_UPS = {  # question -> attribute whose value answers it
    "What color is the shape?": "color",
    "Which shape is it?": "shape",
    "Where is the shape?": "position",
}

_CAPTION_RE = re.compile(
    rf"^a (?P<color>{'|'.join(COLORS)}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"in the (?P<position>{'|'.join(map(re.escape, POSITIONS))}) \.$"
)


def caption(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} in the {position} ."


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes named in a caption; a value is ``None`` when the text does not name one clearly."""
    text = text.strip()
    match = _CAPTION_RE.match(text)
    if match:
        return match.groupdict()
    found = {}
    for attr, vocab in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
        hits = [v for v in vocab if re.search(rf"\b{re.escape(v)}\b", text)]
        if attr == "position":  # "center" never collides; "top left" etc. are distinct phrases
            hits = [v for v in hits if not any(v != h and v in h for h in hits)]
        found[attr] = hits[0] if len(hits) == 1 else None
    return found


def draw_shape(
    size: int, color: str, shape: str, position: str, rng: random.Random, noise_seed: tuple[int, ...] = (0,)
) -> Image.Image:
    # the grain is drawn from its own seed: PIL's effect_noise reads C's rand(), so the same seed gave other pixels
    # on every call, and the shape's own draws from ``rng`` stay what they were
    grain = np.random.default_rng(noise_seed).normal(128, 12, (size, size))
    noise = Image.fromarray(grain.clip(0, 255).astype(np.uint8)).convert("RGB")
    image = Image.blend(Image.new("RGB", (size, size), (45, 45, 50)), noise, 0.25)
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[position]
    radius = size * rng.uniform(0.15, 0.2)
    cx = size * fx + rng.uniform(-0.04, 0.04) * size
    cy = size * fy + rng.uniform(-0.04, 0.04) * size
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        r = radius * 0.9
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        pts = [
            (cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        t = radius * 0.35
        draw.rectangle([cx - radius, cy - t, cx + radius, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - radius, cx + t, cy + radius], fill=fill)
    return image


def make_record(index: int, rng: random.Random, *, prefix: str, max_turns: int) -> tuple[dict, tuple[str, str, str]]:
    color, shape, position = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
    prompt = rng.choice(PROMPTS)
    human = f"{IMAGE_TOKEN}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n{IMAGE_TOKEN}"
    conversations = [{"from": "human", "value": human}, {"from": "gpt", "value": caption(color, shape, position)}]
    attrs = {"color": color, "shape": shape, "position": position}
    k = rng.randint(0, max_turns - 1)
    questions = (
        rng.sample(list(FOLLOW_UPS), k=k) if k <= len(FOLLOW_UPS) else [rng.choice(list(FOLLOW_UPS)) for _ in range(k)]
    )
    for question in questions:
        conversations += [
            {"from": "human", "value": question},
            {"from": "gpt", "value": f"{attrs[FOLLOW_UPS[question]]} ."},
        ]
    name = f"{prefix}_{index:06d}"
    return {"id": name, "image": f"{name}.jpg", "conversations": conversations}, (color, shape, position)


ORDINALS = ("first", "second")


def make_pair_record(index: int, rng: random.Random, *, prefix: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """Two images of the same shape in different colours; the question asks the colour of one of them, named by
    its place, so only a model that tells the two images apart answers it. (The comparison "which image has the
    red circle?" needs more depth than the tiny demo LLM has: it stayed at chance for 1,500 steps.)"""
    shape = rng.choice(SHAPES)
    colors = rng.sample(list(COLORS), 2)
    drawn = [(color, shape, rng.choice(list(POSITIONS))) for color in colors]
    target = rng.randrange(2)
    human = (
        f"First:\n{IMAGE_TOKEN}\nSecond:\n{IMAGE_TOKEN}\nWhat colour is the {shape} in the {ORDINALS[target]} image?"
    )
    name = f"{prefix}_{index:06d}"
    record = {
        "id": name,
        "image": [f"{name}_a.jpg", f"{name}_b.jpg"],
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": f"{colors[target]} ."}],
    }
    return record, drawn


def write_shapes(
    out: str | Path,
    n: int,
    *,
    seed: int = 0,
    size: int = 336,
    max_turns: int = 1,
    prefix: str = "shapes",
    progress: bool = False,
    json_name: str = "chat.json",
    pair_ratio: float = 0.0,
) -> Path:
    """Write ``out/chat.json`` (or ``json_name``) and ``out/images/*.jpg``; returns the JSON path. A ``pair_ratio``
    share of the records is the two-image task."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    indices = range(n)
    if progress:
        from rich.progress import track

        indices = track(indices, description=f"synth {n} images")
    for i in indices:
        if pair_ratio and rng.random() < pair_ratio:
            record, drawn = make_pair_record(i, rng, prefix=prefix)
            names = record["image"]
        else:
            record, attrs = make_record(i, rng, prefix=prefix, max_turns=max_turns)
            names, drawn = [record["image"]], [attrs]
        for k, (name, (color, shape, position)) in enumerate(zip(names, drawn)):
            draw_shape(size, color, shape, position, rng, (seed, i, k)).save(images / name, quality=92)
        records.append(record)
    path = out / json_name
    path.write_text(json.dumps(records, indent=1))
    return path


def tokenizer_corpus() -> list[str]:
    """Text for training the tiny tokenizer: everything the shapes data and chat scaffolding can say."""
    lines = [caption(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    lines += list(PROMPTS) + list(FOLLOW_UPS) + [f"{v} ." for v in (*COLORS, *SHAPES, *POSITIONS)]
    lines += [
        "system",
        "user",
        "assistant",
        "You are a helpful assistant.",
        "The quick brown fox jumps over the lazy dog while a picture shows the scene in the photo.",
        "Question: what is in the image? Answer: a small object with a color and a shape.",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000",
    ]
    return lines


def attribute_accuracy(predictions: list[dict]) -> dict:
    """Accuracy per attribute (colour, shape, position) of predicted captions, over the predictions whose reference
    is a shapes caption (the two-image task's answers are colours, scored by exact match); empty when none is. An
    extra scorer for ``llava_loop.evaluate.evaluate_model``."""
    parsed = [
        (match.groupdict(), parse_caption(p["prediction"]))
        for p in predictions
        if (match := _CAPTION_RE.match(p["reference"].strip()))
    ]
    if not parsed:
        return {}
    return {
        f"{attr}_accuracy": sum(ref[attr] == pred[attr] for ref, pred in parsed) / len(parsed) for attr in ATTRIBUTES
    }
