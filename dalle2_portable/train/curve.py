"""The loss curve of a run as a PNG (RUN/loss.png), drawn with Pillow: each step's loss in light grey, its
running mean over `window` steps in blue, on a log scale when the losses span more than a factor of 10."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..images import save_png

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def draw_curve(losses: list[float], title: str, window: int = 20) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    values = np.asarray([x for x in losses if math.isfinite(x) and x > 0], np.float64)
    draw.text((MARGIN, 8), title, fill="black")
    if len(values) < 2:
        draw.text((MARGIN, HEIGHT // 2), "not enough steps yet", fill="black")
        return image
    log = values.max() / values.min() > 10
    ys = np.log10(values) if log else values
    mean = np.convolve(ys, np.ones(min(window, len(ys))) / min(window, len(ys)), mode="valid")
    lo, hi = ys.min(), ys.max()
    span = hi - lo or 1.0

    def point(i: int, y: float, n: int) -> tuple[float, float]:
        x = MARGIN + (WIDTH - 2 * MARGIN) * i / max(1, n - 1)
        return x, HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (y - lo) / span

    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    draw.line([point(i, y, len(ys)) for i, y in enumerate(ys)], fill=(190, 190, 190))
    offset = len(ys) - len(mean)
    draw.line([point(i + offset, y, len(ys)) for i, y in enumerate(mean)], fill=(30, 80, 220), width=2)
    label = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
    draw.text((4, MARGIN - 6), label(hi), fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), label(lo), fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 6), "step 1", fill="black")
    draw.text((WIDTH - MARGIN - 60, HEIGHT - MARGIN + 6), f"step {len(losses)}", fill="black")
    draw.text((WIDTH - MARGIN - 200, 8), f"loss{' (log scale)' if log else ''}, mean of {window}",
              fill=(30, 80, 220))
    return image


def write_curve(path, losses: list[float], title: str) -> None:
    """Replace `path` atomically with the curve (images.save_png's writer)."""
    save_png(draw_curve(losses, title), path, overwrite=True)
