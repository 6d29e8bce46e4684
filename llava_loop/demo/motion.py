"""The video demo's synthetic "motion" clips: a shape crossing the frame in one of four directions.

Each clip shows one coloured shape on a noisy background, moving left, right, up or down at a steady speed. Where
the shape is at the clip's middle is drawn independently of its direction, so the middle frame (what one sampled
frame shows: ``FrameSampling(1)`` takes the middle time) says nothing about the direction, while two or more frames
give it away. Records follow LLaVA-Video-178K's layout (``video`` beside ``conversations``) with the ``<video>``
tag; ``frame_lists`` writes some videos as folders of frame images instead of files. ``direction_accuracy`` scores
generated answers.

Clips are encoded with PyAV's bundled MPEG-4 encoder (the ``video`` extra).
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..template import VIDEO_TOKEN
from .shapes import COLORS

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTIONS = (
    "Which way does the shape move?",
    "In which direction is the shape moving?",
    "Where is the shape going: left, right, up or down?",
)


def clip_frames(rng: random.Random, size: int, frames: int) -> tuple[str, list[Image.Image]]:
    """A direction and the frames showing a shape moving that way."""
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    color = COLORS[rng.choice(list(COLORS))]
    radius = size // 7
    speed = size * 0.6 / frames  # 60% of the frame over the clip: from about 0.2 to 0.8 of the side
    middle = (rng.uniform(0.4, 0.6) * size, rng.uniform(0.4, 0.6) * size)
    noise = np.random.default_rng(rng.randrange(1 << 30))
    out = []
    for i in range(frames):
        step = i - (frames - 1) / 2
        x, y = middle[0] + dx * speed * step, middle[1] + dy * speed * step
        background = noise.integers(0, 32, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(background)
        ImageDraw.Draw(image).ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
        out.append(image)
    return direction, out


def write_clip(path: Path, frames: list[Image.Image], fps: int = 8) -> None:
    import av

    width, height = frames[0].size
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"qscale": "2"}  # near-lossless: the test clips' pixels stay close to what was drawn
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_motion(
    root: str | Path, n: int, *, seed: int, size: int = 64, frames: int = 16, frame_lists: float = 0.0
) -> Path:
    """``n`` motion records (``root/motion.json``) and their clips (``root/videos/``); a ``frame_lists`` share of
    them as folders of PNG frames."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        direction, images = clip_frames(rng, size, frames)
        name = f"clip_{seed}_{i:05d}"
        if rng.random() < frame_lists:
            folder = root / "videos" / name
            folder.mkdir(exist_ok=True)
            video = []
            for j, image in enumerate(images):
                image.save(folder / f"{j:03d}.png")
                video.append(f"{name}/{j:03d}.png")
        else:
            write_clip(root / "videos" / f"{name}.mp4", images)
            video = f"{name}.mp4"
        question = rng.choice(QUESTIONS)
        records.append(
            {
                "id": name,
                "video": video,
                "conversations": [
                    {"from": "human", "value": f"{VIDEO_TOKEN}\n{question}"},
                    {"from": "gpt", "value": direction},
                ],
            }
        )
    path = root / "motion.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def direction_accuracy(predictions: list[str], references: list[str]) -> dict:
    """Share of answers naming the right direction (the first direction word in the answer)."""

    def named(text: str) -> str | None:
        words = text.lower().replace(".", " ").split()
        return next((w for w in words if w in DIRECTIONS), None)

    hits = [named(p) == named(r) for p, r in zip(predictions, references)]
    return {"direction_accuracy": sum(hits) / max(len(hits), 1)}
