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
    """Loss against step on a log scale (the interesting part of a converging run spans decades)."""
    import math

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(18), _font(13)
    left, right, top, bottom = 70, width - 20, 40, height - 45
    draw.text((left, 8), title, fill="black", font=font)
    points = [(s, v) for s, v in train + evals if v == v and v > 0]
    if not points:
        return image
    max_step = max(s for s, _ in points) or 1
    low = math.floor(math.log10(min(v for _, v in points)))
    high = math.ceil(math.log10(max(v for _, v in points)))
    high = max(high, low + 1)

    def xy(step, value):
        fraction = (math.log10(max(value, 10.0**low)) - low) / (high - low)
        return left + (right - left) * step / max_step, bottom - (bottom - top) * fraction

    draw.rectangle([left, top, right, bottom], outline=GREY)
    for exponent in range(low, high + 1):  # y ticks at powers of ten
        y = xy(0, 10.0**exponent)[1]
        draw.line([left - 4, y, right, y], fill=(235, 235, 235))
        draw.text((8, y - 8), f"{10.0**exponent:g}", fill=GREY, font=small)
    for i in range(6):  # x ticks
        step = max_step * i / 5
        x = xy(step, 10.0**low)[0]
        draw.line([x, bottom, x, bottom + 4], fill=GREY)
        draw.text((x - 12, bottom + 6), f"{int(step)}", fill=GREY, font=small)
    draw.text(((left + right) // 2 - 60, bottom + 24), "optimizer step (loss on a log scale)", fill="black", font=small)
    train = [(s, v) for s, v in train if v == v and v > 0]
    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train], fill=BLUE, width=2)
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


def _fit(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + [line]


def draw_grid(predictions: list[dict], image_dir: Path, columns: int = 4, tile: int = 250) -> Image.Image:
    font = _font(13)
    picture, caption_h = 176, 112
    rows = (len(predictions) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (picture + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(predictions):
        x, y = (i % columns) * tile, (i // columns) * (picture + caption_h)
        ok = p["exact"]
        colour = GREEN if ok else RED
        side = (picture - 8) // max(len(p["images"]), 1)  # a question's images side by side; none for text-only
        for k, name in enumerate(p["images"]):
            with Image.open(image_dir / name) as im:
                grid.paste(
                    im.convert("RGB").resize((side, side), Image.NEAREST),
                    (x + (tile - picture) // 2 + 4 + k * side, y + 4 + (picture - 8 - side) // 2),
                )
        draw.rectangle(
            [x + (tile - picture) // 2 + 1, y + 1, x + (tile + picture) // 2 - 2, y + picture - 2],
            outline=colour,
            width=3,
        )
        lines = [
            (f"{'ref:' if j == 0 else '    '} {line}", "black")
            for j, line in enumerate(_fit(draw, p["reference"], font, tile - 50))
        ]
        lines += [
            (f"{'pred:' if j == 0 else '     '} {line}", colour)
            for j, line in enumerate(_fit(draw, p["prediction"], font, tile - 50))
        ]
        lines.append(("correct" if ok else "wrong", colour))
        for j, (text, fill) in enumerate(lines[:6]):
            draw.text((x + 8, y + picture + 2 + 17 * j), text, fill=fill, font=font)
    return grid


def write_report(
    out: Path, metrics_file: Path, predictions: list[dict], image_dir: Path, title: str, summary: list[str] = ()
) -> Path:
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
