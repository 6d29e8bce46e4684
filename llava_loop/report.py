"""report.png: loss curves (train and eval) above a grid of held-out images with reference and predicted
captions, correct ones marked. Drawn with Pillow, so no plotting library is needed."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

GREEN, RED, GREY, BLUE, ORANGE = (20, 140, 60), (200, 40, 40), (110, 110, 110), (40, 90, 200), (230, 120, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        m = json.loads(line)
        if m["kind"] == "train":
            train.append((m["step"], m["loss"]))
        elif m["kind"] == "eval":
            evals.append((m["step"], m["eval_loss"]))
    return train, evals


def draw_curves(train, evals, width: int, height: int, title: str) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(18), _font(13)
    left, right, top, bottom = 70, width - 20, 40, height - 45
    draw.text((left, 8), title, fill="black", font=font)
    points = train + evals
    if not points:
        return image
    max_step = max(s for s, _ in points) or 1
    low, high = 0.0, max(v for _, v in points if v == v) * 1.05

    def xy(step, value):
        return (left + (right - left) * step / max_step, bottom - (bottom - top) * (value - low) / (high - low or 1))

    draw.rectangle([left, top, right, bottom], outline=GREY)
    for i in range(6):  # y ticks
        value = low + (high - low) * i / 5
        y = xy(0, value)[1]
        draw.line([left - 4, y, left, y], fill=GREY)
        draw.text((8, y - 8), f"{value:.2f}", fill=GREY, font=small)
    for i in range(6):  # x ticks
        step = max_step * i / 5
        x = xy(step, low)[0]
        draw.line([x, bottom, x, bottom + 4], fill=GREY)
        draw.text((x - 12, bottom + 6), f"{int(step)}", fill=GREY, font=small)
    draw.text(((left + right) // 2 - 30, bottom + 24), "optimizer step", fill="black", font=small)
    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train if v == v], fill=BLUE, width=2)
    if evals:
        if len(evals) > 1:
            draw.line([xy(s, v) for s, v in evals], fill=ORANGE, width=3)
        for s, v in evals:
            x, y = xy(s, v)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=ORANGE)
    draw.line([right - 170, top + 14, right - 140, top + 14], fill=BLUE, width=2)
    draw.text((right - 134, top + 6), "train loss", fill="black", font=small)
    draw.line([right - 170, top + 34, right - 140, top + 34], fill=ORANGE, width=3)
    draw.text((right - 134, top + 26), "held-out loss", fill="black", font=small)
    return image


def draw_grid(predictions: list[dict], image_dir: Path, columns: int = 4, tile: int = 200) -> Image.Image:
    font = _font(13)
    rows = (len(predictions) + columns - 1) // columns
    caption_h = 62
    grid = Image.new("RGB", (columns * tile, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(predictions):
        x, y = (i % columns) * tile, (i // columns) * (tile + caption_h)
        with Image.open(image_dir / p["image"]) as im:
            grid.paste(im.convert("RGB").resize((tile - 8, tile - 8), Image.NEAREST), (x + 4, y + 4))
        ok = p["exact"]
        draw.rectangle([x + 2, y + 2, x + tile - 3, y + tile - 3], outline=GREEN if ok else RED, width=3)
        draw.text((x + 6, y + tile + 2), f"ref:  {p['reference']}", fill="black", font=font)
        draw.text((x + 6, y + tile + 20), f"pred: {p['prediction']}", fill=GREEN if ok else RED, font=font)
        draw.text((x + 6, y + tile + 38), "correct" if ok else "wrong", fill=GREEN if ok else RED, font=font)
    return grid


def write_report(out: Path, metrics_file: Path, predictions: list[dict], image_dir: Path, title: str,
                 summary: list[str] = ()) -> Path:
    """Compose curves, a summary block and the caption grid into ``out`` (a PNG)."""
    grid = draw_grid(predictions, Path(image_dir))
    curves = draw_curves(*read_metrics(metrics_file), grid.width, 300, title)
    font = _font(15)
    summary_h = 12 + 22 * len(summary)
    page = Image.new("RGB", (grid.width, curves.height + summary_h + grid.height), "white")
    page.paste(curves, (0, 0))
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(summary):
        draw.text((20, curves.height + 6 + 22 * i), line, fill="black", font=font)
    page.paste(grid, (0, curves.height + summary_h))
    page.save(out)
    return out
