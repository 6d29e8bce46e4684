"""The preference demo's data: shapes captions that name a second, absent object, and pairs that prefer the
faithful caption.

Its SFT set hallucinates where the data teaches it to: an image whose shape sits in a top position is captioned
with a second object that is not there ("... in the top left and a blue square .") in ``share`` of its records, so a
model trained on it says so at greedy decoding. Its preference pairs, on other images of every position, choose the
faithful caption over the same caption with a second object; the held-out set is faithful. Scored by
``hallucination_scores``: how often a caption names a second object, and whether its first object is right.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .shapes import COLORS, POSITIONS, PROMPTS, SHAPES, caption, draw_shape, parse_caption

SECOND = re.compile(rf" and a (?:{'|'.join(COLORS)}) (?:{'|'.join(SHAPES)})")


def with_second_object(faithful: str, rng: random.Random, color: str, shape: str) -> str:
    """The caption with an object that is not in the image: another colour and shape than the one there is."""
    other_color = rng.choice([c for c in COLORS if c != color])
    other_shape = rng.choice([s for s in SHAPES if s != shape])
    return f"{faithful[:-2]} and a {other_color} {other_shape} ."


def write_sets(root: Path, *, sft: int, pairs: int, val: int, seed: int = 0, share: float = 0.9, size: int = 64):
    """``root/sft.json``, ``root/pairs.json`` and ``root/val.json`` with their images in ``root/images``; returns
    their paths."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    sets = {"sft": [], "pairs": [], "val": []}
    for kind, count in (("sft", sft), ("pairs", pairs), ("val", val)):
        for i in range(count):
            color, shape, position = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
            name = f"{kind}_{i:06d}"
            draw_shape(size, color, shape, position, rng, (seed, ("sft", "pairs", "val").index(kind), i)).save(
                images / f"{name}.jpg"
            )
            prompt, faithful = rng.choice(PROMPTS), caption(color, shape, position)
            if kind == "pairs":
                rejected = with_second_object(faithful, rng, color, shape)
                sets[kind].append(
                    {"id": name, "image": f"{name}.jpg", "prompt": prompt, "chosen": faithful, "rejected": rejected}
                )
                continue
            text = faithful
            if kind == "sft" and position.startswith("top") and rng.random() < share:
                text = with_second_object(faithful, rng, color, shape)
            conversations = [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": text}]
            sets[kind].append({"id": name, "image": f"{name}.jpg", "conversations": conversations})
    paths = {}
    for kind, records in sets.items():
        paths[kind] = root / f"{kind}.json"
        paths[kind].write_text(json.dumps(records, indent=1))
    return paths


def hallucination_scores(predictions: list[dict]) -> dict:
    """``hallucination_rate``: the share of captions that name a second object; ``first_object_accuracy``: the
    share whose first object (colour, shape and position) is the image's. An extra scorer for
    ``llava_loop.evaluate.evaluate_model``."""
    if not predictions:
        return {}
    named, right = 0, 0
    for p in predictions:
        text = p["prediction"].strip()
        second = SECOND.search(text)
        named += second is not None
        first = parse_caption(text[: second.start()] + " ." if second else text)
        right += first == parse_caption(p["reference"])
    return {"hallucination_rate": named / len(predictions), "first_object_accuracy": right / len(predictions)}
