"""The pixel judge: which named colour and which shape one picture of the shapes data shows, by NumPy alone.

    from dalle2_portable.judge import judge
    j = judge(image)        # PIL or H x W x 3 uint8 -> Judgement(color="red", shape="circle", confidence=0.93, ...)
    j.matches("red", "circle"); j.note   # why a field is None, when one is

The background is the median of the border pixels; the foreground is the largest connected region of pixels
far from it; its colour is the median of the inner half of that region's inside (eroded by a pixel, then the
pixels farthest from the background), named as the nearest of `shapes.COLOURS`. Each pixel's coverage (its
place between the background and the foreground colour, so anti-aliased and blurred edges count in part) is
upsampled bilinearly until the shape is ~96 px across and cut at 0.5, and the shape is the nearest prototype in
three measures of that mask: the fill of its bounding box (square 1, circle pi/4, triangle 1/2), the share of
its area in the top half (1/2, 1/2, 1/4: an upright triangle is bottom-heavy) and its row widths' growth from
the top third to the bottom third (0, 0, 2/3 of the widest row). Whatever is far from every prototype, or
about as near two, is reported as unsure (None), never guessed; so is a colour far from every named one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import Dalle2Error
from .train.shapes import COLOURS, SHAPES

_NAMES = tuple(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], np.float64)
# (fill, top share, growth) of each shape drawn exactly, and the spread each measure is scaled by.
PROTOTYPES = {"square": (1.0, 0.5, 0.0), "circle": (np.pi / 4, 0.5, 0.0), "triangle": (0.5, 0.25, 2 / 3)}
_SPREAD = np.array([0.08, 0.05, 0.12])
MAX_SHAPE_OFF = 3.0      # a measure farther than this (in spreads) from the nearest prototype's: unsure
MIN_MARGIN = 0.3          # 1 - nearest / second-nearest below this: unsure (shape and colour alike)
MAX_COLOR_DISTANCE = 100.0  # RGB distance beyond which the colour is none of the named ones
MAX_BACKGROUND_SPREAD = 60.0  # the border pixels' spread (see judge) above this: the background is not plain
_WORK = 128               # larger pictures are box-reduced to this side first
_MIN_AREA = 4             # a foreground of fewer pixels is no shape


@dataclass(frozen=True)
class Judgement:
    """What the judge saw. shape: a name of shapes.SHAPES, "none" (no foreground), or None (unsure); color: a
    name of shapes.COLOURS or None (unsure, or no foreground). Confidences are margins in [0, 1] (1 - nearest /
    second-nearest distance); `confidence` is the smaller. box: (x0, y0, x1, y1) as fractions of the side."""

    color: str | None
    shape: str | None
    confidence: float = 0.0
    color_confidence: float = 0.0
    shape_confidence: float = 0.0
    background: str | None = None
    rgb: tuple[int, int, int] | None = None
    box: tuple[float, float, float, float] | None = None
    features: dict = field(default_factory=dict)  # fill, top, growth, aspect, area, distances
    note: str = ""                                # why something is None

    def matches(self, color: str | None = None, shape: str | None = None) -> bool:
        return (color is None or self.color == color) and (shape is None or self.shape == shape)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if max(image.size) > _WORK:
            scale = _WORK / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BOX)
        return np.asarray(image, np.float64)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise Dalle2Error(f"judge takes a PIL image or an H x W x 3 uint8 array, got {a.dtype} {a.shape}")
    return _as_array(Image.fromarray(a)) if max(a.shape[:2]) > _WORK else a.astype(np.float64)


def _shift_and(m: np.ndarray) -> np.ndarray:
    """4-neighbour erosion (outside the picture counts as background)."""
    p = np.pad(m, 1)
    return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _dilate(m: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        p = np.pad(m, 1)
        m = m | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a mask, largest first: min-label propagation with pointer jumping."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        new = np.where(mask, new, big)
        flat = new.ravel()
        inside = flat < big
        for _ in range(4):  # each label points at a pixel of its region; follow the pointers
            flat[inside] = flat[flat[inside]]
        if np.array_equal(new, lab):
            break
        lab = new
    labels, counts = np.unique(lab[mask], return_counts=True)
    return [lab == labels[i] for i in np.argsort(-counts, kind="stable")]


def _nearest(distances: np.ndarray) -> tuple[int, float]:
    """The index of the smallest distance, and its margin 1 - nearest / second-nearest."""
    order = np.argsort(distances)
    d1, d2 = distances[order[0]], distances[order[1]]
    return int(order[0]), float(1.0 - d1 / d2) if d2 > 0 else 0.0


def _name_colour(fg: np.ndarray) -> tuple[str | None, float, str]:
    d = np.linalg.norm(_RGB - fg, axis=1)
    i, margin = _nearest(d)
    if d[i] > MAX_COLOR_DISTANCE:
        return None, margin, f"foreground colour {tuple(int(v) for v in fg)} is none of the named ones"
    if margin < MIN_MARGIN:
        return None, margin, f"foreground colour {tuple(int(v) for v in fg)} between two named ones"
    return _NAMES[i], margin, ""


def _measure(cover: np.ndarray, region: np.ndarray) -> tuple[dict, tuple | None]:
    """The mask's fill, top share, growth and aspect, from the coverage upsampled around the region and cut at
    0.5; and its box as fractions of the picture."""
    h, w = cover.shape
    ys, xs = np.nonzero(_dilate(region, 1))
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    k = int(np.clip(np.ceil(96 / max(y1 - y0, x1 - x0)), 1, 16))
    crop = Image.fromarray(cover[y0:y1, x0:x1].astype(np.float32), mode="F")
    up = np.asarray(crop.resize(((x1 - x0) * k, (y1 - y0) * k), Image.BILINEAR)) >= 0.5
    if not up.any():
        return {}, None
    rows, cols = np.nonzero(up.any(1))[0], np.nonzero(up.any(0))[0]
    m = up[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    mh, mw = m.shape
    widths = m.sum(1).astype(np.float64)
    third = max(1, mh // 3)
    top = widths[:mh // 2].sum() + (mh % 2) * widths[mh // 2] / 2  # the middle row of an odd height: half
    features = {"fill": float(m.mean()), "top": float(top / widths.sum()),
                "growth": float((widths[-third:].mean() - widths[:third].mean()) / widths.max()),
                "aspect": float(mw / mh)}
    box = ((x0 + cols[0] / k) / w, (y0 + rows[0] / k) / h, (x0 + (cols[-1] + 1) / k) / w,
           (y0 + (rows[-1] + 1) / k) / h)
    return features, tuple(float(v) for v in box)


def _name_shape(features: dict) -> tuple[str | None, float, str]:
    measured = np.array([features["fill"], features["top"], features["growth"]])
    off = [np.abs(measured - PROTOTYPES[s]) / _SPREAD for s in SHAPES]  # each measure's distance, in spreads
    d = np.array([np.linalg.norm(o) for o in off])
    features["distances"] = {s: round(float(v), 3) for s, v in zip(SHAPES, d)}
    i, margin = _nearest(d)
    if not 0.6 <= features["aspect"] <= 1.6:
        return None, margin, f"stretched (width / height {features['aspect']:.2f})"
    if off[i].max() > MAX_SHAPE_OFF:
        return None, margin, f"the foreground looks like none of the shapes (nearest {SHAPES[i]})"
    if margin < MIN_MARGIN:
        return None, margin, f"between {SHAPES[i]} and {SHAPES[int(np.argsort(d)[1])]}"
    return SHAPES[i], margin, ""


def judge(image) -> Judgement:
    """Name the colour and the shape of the one shape on a plain background in `image` (PIL or H x W x 3
    uint8); the module docstring says how."""
    a = _as_array(image)
    h, w, _ = a.shape
    if min(h, w) < 8:
        raise Dalle2Error(f"judge needs a picture of at least 8 x 8 px, got {w} x {h}")
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg = np.median(border, axis=0)
    bg_name = _NAMES[int(np.argmin(np.linalg.norm(_RGB - bg, axis=1)))]
    dist = np.linalg.norm(a - bg, axis=2)
    # how plain the background is: ~ the 90th percentile of noise's distances, unmoved by a shape at the edge
    spread = 1.6 * float(np.median(np.linalg.norm(border - bg, axis=1)))
    if spread > MAX_BACKGROUND_SPREAD:
        return Judgement(None, None, background=bg_name, note=f"the background is not plain (spread {spread:.0f})")
    rough = dist > float(np.clip(3 * spread, 30.0, 42.0))  # below half the closest named pair's distance (86)
    regions = _components(rough) if rough.any() else []
    if not regions or regions[0].sum() < _MIN_AREA:
        return Judgement(None, "none", 1.0, 1.0, 1.0, bg_name, note="no foreground")
    region = regions[0]
    inside = _shift_and(region)
    if inside.sum() < 3:
        inside = region
    core = dist[inside]
    fg = np.median(a[inside][core >= np.median(core)], axis=0)  # the inner half: blur reaches least there
    color, color_conf, color_note = _name_colour(fg)
    axis = fg - bg  # coverage: each pixel's place between the background (0) and the foreground colour (1)
    cover = np.clip((a - bg) @ axis / max(float(axis @ axis), 1e-9), 0.0, 1.0) * _dilate(region, 2)
    features, box = _measure(cover, region)
    features["area"] = float(cover.sum() / (h * w))
    shape, shape_conf, shape_note = _name_shape(features) if box else (None, 0.0, "no foreground at half cover")
    if len(regions) > 1 and regions[1].sum() >= 0.3 * region.sum():
        shape, shape_note = None, f"{len(regions)} separate foreground regions"
    solid = cover >= 0.5
    edge = np.concatenate([solid[0], solid[-1], solid[1:-1, 0], solid[1:-1, -1]]).mean()
    if edge > 0.1:  # the shapes data keeps every shape off the edge
        shape, shape_note = None, f"the foreground covers {edge:.0%} of the border"
    return Judgement(color, shape, min(color_conf, shape_conf), color_conf, shape_conf, bg_name,
                     tuple(int(round(v)) for v in fg), box, features,
                     "; ".join(n for n in (color_note, shape_note) if n))
