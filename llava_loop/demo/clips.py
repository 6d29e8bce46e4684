"""The video demo's synthetic clips: two shapes that appear one after the other.

Each clip shows, on a noisy background, a shape of one colour from its first frame and a shape of another colour
that appears later, before the clip's middle; both stay to the end, each at its own random place. The question is
which colour appeared first. The middle frame (what one sampled frame shows: ``FrameSampling(1)`` takes the middle
time) holds both shapes and says nothing of their order, so one frame can do no better than a coin between the two
colours it sees (50%); several frames show the first alone. Records follow LLaVA-Video-178K's layout (``video``
beside ``conversations``) with the ``<video>`` tag; ``frame_lists`` writes some videos as folders of frame images
instead of files. ``order_accuracy`` scores generated answers.

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

QUESTIONS = (
    "Which colour appears first?",
    "Which shape was there first? Name its colour.",
    "What colour is the shape that shows up first?",
)


def clip_frames(rng: random.Random, size: int, frames: int) -> tuple[str, list[Image.Image]]:
    """The first shape's colour, and the frames: the first shape from frame 0, the second from a frame between 2
    and the middle's (exclusive), each at its own place in its own half of the frame."""
    first, second = rng.sample(list(COLORS), 2)
    appears = rng.randrange(2, max(3, frames // 2))
    radius = size // 7
    halves = [(0.05, 0.45), (0.55, 0.95)]
    rng.shuffle(halves)  # which half holds the first shape says nothing of the order
    places = [(rng.uniform(*half) * size, rng.uniform(0.2, 0.8) * size) for half in halves]
    noise = np.random.default_rng(rng.randrange(1 << 30))
    out = []
    for i in range(frames):
        image = Image.fromarray(noise.integers(0, 32, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for (x, y), colour, start in zip(places, (first, second), (0, appears)):
            if i >= start:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=COLORS[colour])
        out.append(image)
    return first, out


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


def write_clips(
    root: str | Path, n: int, *, seed: int, size: int = 64, frames: int = 16, frame_lists: float = 0.0
) -> Path:
    """``n`` records (``root/clips.json``) and their clips (``root/videos/``); a ``frame_lists`` share of them as
    folders of PNG frames."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        answer, images = clip_frames(rng, size, frames)
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
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    path = root / "clips.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def order_accuracy(predictions: list[dict]) -> dict:
    """Share of generated answers whose first colour word is the one that appeared first (an extra scorer for
    ``evaluate``)."""

    def named(text: str) -> str | None:
        return next((w for w in text.lower().replace(".", " ").split() if w in COLORS), None)

    hits = [named(p["prediction"]) == named(p["reference"]) for p in predictions]
    return {"order_accuracy": sum(hits) / max(len(hits), 1)}
