"""``data check --report report.png``: what a dataset holds, in six panels drawn with Pillow (no plotting library):
token lengths (text, image and video placeholders, total) against ``data.max_length`` and the token budget, answers
per record, images per record, image sizes, aspect ratios, and what training would skip; for data with videos, two
more: video lengths (seconds) and frames per video.

``draw_report`` returns the image and, for each panel, where it drew each bar (``Panel.bars``), so a test can read
the picture back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, COLUMNS, PANEL_HEIGHT = 1400, 2, 403
HEIGHT = 50 + 3 * PANEL_HEIGHT  # six panels; data with videos adds a row
INK, GRID, MUTED = (30, 30, 30), (225, 225, 225), (120, 120, 120)
TEXT, IMAGE, TOTAL, BAR = (40, 90, 200), (230, 120, 20), (30, 30, 30), (70, 120, 180)
LIMIT, BUDGET = (200, 40, 40), (20, 140, 60)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


@dataclass
class Panel:
    """One chart's plotting box; ``bars`` maps each bar's label to its rectangle (x0, y0, x1, y1)."""

    title: str
    box: tuple[int, int, int, int]
    bars: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def _frame(draw: ImageDraw.ImageDraw, index: int, title: str, note: str = "") -> Panel:
    col, row = index % COLUMNS, index // COLUMNS
    w, h = WIDTH // COLUMNS, PANEL_HEIGHT
    x, y = col * w, 50 + row * h
    draw.text((x + 60, y + 8), title, fill=INK, font=_font(17))
    if note:
        draw.text((x + 60, y + 30), note, fill=MUTED, font=_font(13))
    box = (x + 60, y + 52, x + w - 25, y + h - 40)
    draw.rectangle(box, outline=GRID)
    return Panel(title, box)


def _bars(draw, panel: Panel, labels: list[str], counts: list[int], colour=BAR) -> None:
    x0, y0, x1, y1 = panel.box
    top = max(max(counts, default=0), 1)
    step = min((x1 - x0) / max(len(labels), 1), 150)
    small = _font(12)
    for i, (label, count) in enumerate(zip(labels, counts)):
        left, right = int(x0 + i * step + step * 0.15), int(x0 + (i + 1) * step - step * 0.15)
        height = int((y1 - y0 - 18) * count / top)
        if count:
            rect = (left, y1 - height, right, y1)
            draw.rectangle(rect, fill=colour)
            panel.bars[label] = rect
            draw.text((left, y1 - height - 15), f"{count:,}", fill=INK, font=small)
        draw.text((left, y1 + 6), label, fill=INK, font=small)


def _counted(values: np.ndarray, cap: int) -> tuple[list[str], list[int]]:
    """Counts of 0..cap-1 and of cap or more."""
    clipped = np.minimum(values, cap)
    counts = np.bincount(clipped, minlength=cap + 1) if len(values) else np.zeros(cap + 1, dtype=int)
    return [str(i) for i in range(cap)] + [f"{cap}+"], [int(c) for c in counts]


def _lengths(draw, panel: Panel, dist: dict, max_length: int, budget: int, estimated: bool, too_long: int) -> None:
    total, text = dist["total_tokens"], dist["text_tokens"]
    series = (("total", total, TOTAL), ("text", text, TEXT), ("image + video", total - text, IMAGE))
    x0, y0, x1, y1 = panel.box
    right_edge = max(int(np.percentile(total, 99.9)) if len(total) else 1, max_length) * 1.05
    edges = np.linspace(0, right_edge, 61)
    histograms = [np.histogram(values, edges)[0] for _, values, _ in series]
    top = max(max(int(h.max()) for h in histograms), 1)
    small = _font(12)

    def x_of(tokens: float) -> int:
        return int(x0 + (x1 - x0) * min(tokens / right_edge, 1.0))

    for (_, _, colour), hist in zip(series, histograms):  # each a step outline, so overlaps stay readable
        points = []
        for i, count in enumerate(hist):
            y = int(y1 - (y1 - y0 - 10) * count / top)
            points += [(x_of(edges[i]), y), (x_of(edges[i + 1]), y)]
        draw.line([(x0, y1), *points, (x1, y1)], fill=colour, width=2)
    draw.line([(x_of(max_length), y0), (x_of(max_length), y1)], fill=LIMIT, width=2)
    over = int((total > max_length).sum())
    draw.text((x_of(max_length) - 120, y0 + 4), f"max_length {max_length}", fill=LIMIT, font=small)
    legend = [("total", TOTAL), ("text", TEXT), ("image + video", IMAGE)]
    for i, (name, colour) in enumerate(legend):
        draw.rectangle((x0 + 10, y0 + 10 + 16 * i, x0 + 22, y0 + 20 + 16 * i), fill=colour)
        draw.text((x0 + 28, y0 + 8 + 16 * i), name, fill=INK, font=small)
    notes = [f"{too_long:,} skipped as too long" + (f", {over:,} estimated over max_length" if estimated else "")]
    if budget:
        mean = float(total.mean()) if len(total) else 0.0
        notes.append(f"token budget {budget}: ~{budget / max(mean, 1):.1f} samples per packed micro-batch")
    if estimated:
        notes.append("lengths estimated (4 characters per token); pass --model for exact counts")
    for i, text_line in enumerate(notes):
        draw.text((x0 + 100, y0 + 8 + 16 * i), text_line, fill=BUDGET if "budget" in text_line else MUTED, font=small)
    for tokens in np.linspace(0, right_edge, 6)[:-1]:
        draw.text((x_of(tokens), y1 + 6), f"{int(tokens)}", fill=INK, font=small)


def _sizes(draw, panel: Panel, sizes: np.ndarray) -> None:
    x0, y0, x1, y1 = panel.box
    small = _font(12)
    if not len(sizes):
        draw.text((x0 + 10, y0 + 10), "no images", fill=MUTED, font=small)
        return
    side = max(int(np.percentile(sizes, 99.5)), 1) * 1.05
    shown = sizes[np.random.default_rng(0).permutation(len(sizes))[:5000]]
    for w, h in shown:
        x, y = x0 + (x1 - x0) * min(w / side, 1), y1 - (y1 - y0) * min(h / side, 1)
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=BAR)
    draw.text((x1 - 90, y1 + 6), f"width {int(side)}", fill=INK, font=small)
    draw.text((x0 - 55, y0), f"h {int(side)}", fill=INK, font=small)
    draw.line([(x0, y1), (x0 + (x1 - x0), y1 - (y1 - y0))], fill=GRID)  # square images lie on the diagonal


ASPECTS = ((0, 1 / 3, "<1:3"), (1 / 3, 1 / 1.5, "1:3-1:1.5"), (1 / 1.5, 1 / 1.1, "tall"), (1 / 1.1, 1.1, "~1:1"))
ASPECTS += ((1.1, 1.5, "wide"), (1.5, 3, "1.5:1-3:1"), (3, math.inf, ">3:1"))


def draw_report(report: dict, title: str, *, max_length: int, budget: int = 0) -> tuple[Image.Image, list[Panel]]:
    dist = report["distributions"]
    videos = len(dist.get("video_frames", ()))
    image = Image.new("RGB", (WIDTH, 50 + PANEL_HEIGHT * (4 if videos else 3)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 12), title, fill=INK, font=_font(20))
    bad = sum(report["problems"].values())
    summary = f"{report['records']:,} records ({bad:,} with problems), {report['images']:,} images"
    summary += f", {videos:,} videos" if videos else ""
    draw.text((WIDTH - 20 - draw.textlength(summary, font=_font(15)), 16), summary, fill=MUTED, font=_font(15))
    panels = [_frame(draw, 0, "tokens per record", "text, image placeholders and their sum")]
    too_long = report["problems"].get("too_long", 0)
    _lengths(draw, panels[0], dist, max_length, budget, report["token_lengths_estimated"], too_long)
    panels.append(_frame(draw, 1, "answers per record", "assistant turns"))
    _bars(draw, panels[1], *_counted(dist["turns"], 10))
    panels.append(_frame(draw, 2, "images per record", "0: text-only"))
    _bars(draw, panels[2], *_counted(dist["images"], 8))
    panels.append(_frame(draw, 3, "image sizes", "width x height, pixels (up to 5,000 shown)"))
    _sizes(draw, panels[3], dist["sizes"])
    panels.append(_frame(draw, 4, "aspect ratios", "width / height"))
    ratios = dist["sizes"][:, 0] / np.maximum(dist["sizes"][:, 1], 1) if len(dist["sizes"]) else np.zeros(0)
    _bars(
        draw, panels[4], [a[2] for a in ASPECTS], [int(((ratios >= lo) & (ratios < hi)).sum()) for lo, hi, _ in ASPECTS]
    )
    problems = report["problems"]
    panels.append(
        _frame(draw, 5, "what training would skip", "by reason" if problems else "nothing: no problems found")
    )
    _bars(draw, panels[5], list(problems), list(problems.values()), colour=LIMIT)
    if videos:
        panels.append(_frame(draw, 6, "video lengths", "seconds (of the record's window); frame lists have none"))
        _bars(draw, panels[6], *_binned(dist["video_seconds"], VIDEO_SECONDS))
        panels.append(_frame(draw, 7, "frames per video", "as sampled (data.video_frames, data.video_fps)"))
        frames = dist["video_frames"]
        labels = [str(n) for n in sorted(set(frames.tolist()))]
        _bars(draw, panels[7], labels, [int((frames == int(n)).sum()) for n in labels])
    return image, panels


VIDEO_SECONDS = (0, 10, 30, 60, 180, 600, 1800, math.inf)


def _binned(values: np.ndarray, edges: tuple) -> tuple[list[str], list[int]]:
    """Counts between consecutive ``edges`` (seconds), labelled like ``10-30s``."""

    def name(lo, hi):
        return f">{lo:g}s" if hi == math.inf else f"{lo:g}-{hi:g}s"

    pairs = list(zip(edges, edges[1:]))
    return [name(lo, hi) for lo, hi in pairs], [int(((values >= lo) & (values < hi)).sum()) for lo, hi in pairs]


def write_report(report: dict, path: str | Path, title: str, *, max_length: int, budget: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_report(report, title, max_length=max_length, budget=budget)[0].save(path)
    return path
