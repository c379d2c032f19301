"""The procedural shapes dataset: coloured upright shapes on plain backgrounds, with captions, from a seed.

    ds = ShapesDataset(length=1000, seed=0, size=64)
    item = ds[3]                       # ShapeItem: image (PIL, 64 x 64 RGB), caption, attributes
    item.caption                       # e.g. "a small blue square on a white background"
    item.attributes.box_at(64)         # the shape's pixel bounding box, to score generated pictures
    ds.image(3, size=128)              # the same scene at 128 px

Item i is a pure function of (seed, i): its random draws come from `np.random.default_rng([seed, i])`, and the
geometry is drawn in coordinates relative to the image side, so one item is one scene at every size. Each
image is drawn with Pillow at 4x its size and reduced by a 4 x 4 box filter (`Image.reduce`): edges are
anti-aliased, and every pixel wholly inside the shape (or the background) has the named colour exactly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import Dalle2Error
from .data import Dataset

# Bumped whenever a change here changes any item's pixels or caption (it is part of the fingerprint).
GENERATOR_VERSION = 3  # v2: half the captions PARAPHRASES; v3: some with a made-up word (the pixels are v1's)

# Named colours, chosen far apart (every pair differs by more than 80 in RGB Euclidean distance).
COLOURS = {
    "red": (230, 25, 25), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (245, 220, 30),
    "orange": (245, 135, 20), "purple": (130, 40, 180), "pink": (250, 140, 200), "white": (255, 255, 255),
    "black": (0, 0, 0), "gray": (128, 128, 128), "brown": (120, 70, 30),
}
SHAPES = ("circle", "square", "triangle")  # upright: the square's sides are axis-aligned, the triangle points up
# The side of the shape's (square) bounding box as a fraction of the image side, per size word.
SIZES = {"small": (0.25, 0.35), "large": (0.55, 0.75)}
MARGIN = 0.03  # the shape keeps this fraction of the side away from every edge
# Where the shape's centre lies on a 3 x 3 grid of the picture, as a caption phrase.
POSITIONS = {
    ("top", "left"): "in the top left corner", ("top", "center"): "at the top",
    ("top", "right"): "in the top right corner", ("middle", "left"): "on the left",
    ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left corner", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right corner",
}
TEMPLATES = (
    "a {color} {shape}",
    "a {size} {color} {shape} on a {background} background",
    "there is one {color} {shape}",
    "a picture of a {size} {color} {shape}",
    "a {color} {shape} {position}",
    "a {size} {color} {shape} {position}, on a {background} background",
)
# Half the captions are written from these instead: other openers, words and word orders (the shape before its
# colour), so the text tower learns to find the colour and the shape in any sentence. The evaluation's NOVEL
# phrasings (evaluate.py) are none of these.
PARAPHRASES = (
    "a photo of a {color} {shape}",
    "an illustration of a {color} {shape}",
    "a rendering of a {size} {color} {shape}",
    "a sketch of one {color} {shape}",
    "this is a {color} {shape}",
    "here we see a {color} {shape} {position}",
    "one {color} {shape}",
    "{size} {color} {shape}",
    "the {color} {shape}",
    "a {shape} in {color}",
    "a {shape}, colored {color}",
    "the {shape} is {color}",
    "a {size} {shape}, {color}, on a {background} background",
    "a {color} colored {shape} on {background}",
    "a simple {color} {shape} shape",
    "a single {size} {color} {shape}, {background} background",
    "look at the {color} {shape}",
    "{color} {shape} {position}",
    "a picture with a {color} {shape} in it",
)
CAPTION_TEMPLATES = TEMPLATES + PARAPHRASES  # ShapeAttributes.template indexes this
PARAPHRASE_RATE = 0.5
# A quarter of the captions get one made-up word (random letters) at a random place, so a word the tokenizer has
# never seen (it is learnt from these captions) reads as noise, not as a colour.
MADE_UP_RATE = 0.25
_NAMED = set(COLOURS) | set(SHAPES) | set(SIZES)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeAttributes:
    """What an item shows, to score generated pictures against. `box` is the shape's bounding box (x0, y0, x1,
    y1) as fractions of the image side (x to the right, y down); `position` the 3 x 3 grid cell of its centre
    ("top left", "middle center", ...); `template` the index in CAPTION_TEMPLATES its caption was written from."""

    color: str
    shape: str
    size: str
    background: str
    box: tuple[float, float, float, float]
    position: str
    template: int

    def box_at(self, size: int) -> tuple[int, int, int, int]:
        """The bounding box in pixels of a `size` px image, (left, top, right, bottom) with right/bottom
        exclusive (a PIL crop box, NumPy's [top:bottom, left:right]): every pixel the shape touches is inside."""
        x0, y0, x1, y1 = self.box
        return (int(np.floor(x0 * size)), int(np.floor(y0 * size)), int(np.ceil(x1 * size)),
                int(np.ceil(y1 * size)))

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.color]

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.background]


@dataclass(frozen=True)
class ShapeItem:
    image: Image.Image
    caption: str
    attributes: ShapeAttributes


def _grid(coordinate: float, names: tuple[str, str, str]) -> str:
    return names[min(2, int(coordinate * 3))]


def draw_attributes(seed: int, index: int) -> tuple[ShapeAttributes, str]:
    """Item `index` of seed `seed`: its attributes and caption, from `np.random.default_rng([seed, index])`."""
    rng = np.random.default_rng([seed, index])
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = names[rng.integers(len(names))]
    background = [n for n in names if n != color][rng.integers(len(names) - 1)]
    size = list(SIZES)[rng.integers(len(SIZES))]
    side = float(rng.uniform(*SIZES[size]))
    lo, hi = side / 2 + MARGIN, 1 - side / 2 - MARGIN
    cx, cy = (float(c) for c in rng.uniform(lo, hi, size=2))
    template = int(rng.integers(len(TEMPLATES)))
    if rng.random() < PARAPHRASE_RATE:  # drawn last (as is the template), so the scene is v1's
        template = len(TEMPLATES) + int(rng.integers(len(PARAPHRASES)))
    row, col = _grid(cy, ("top", "middle", "bottom")), _grid(cx, ("left", "center", "right"))
    attrs = ShapeAttributes(color, shape, size, background, (cx - side / 2, cy - side / 2, cx + side / 2,
                                                             cy + side / 2), f"{row} {col}", template)
    caption = CAPTION_TEMPLATES[template].format(color=color, shape=shape, size=size, background=background,
                                                 position=POSITIONS[row, col])
    if rng.random() < MADE_UP_RATE:  # drawn last too
        words, made_up = caption.split(" "), None
        while made_up is None or made_up in _NAMED:
            made_up = "".join(chr(97 + int(c)) for c in rng.integers(26, size=int(rng.integers(3, 9))))
        words.insert(int(rng.integers(len(words) + 1)), made_up)
        caption = " ".join(words)
    return attrs, re.sub(r"\ba (?=[aeiou])", "an ", caption)  # "an orange circle"


def render(attributes: ShapeAttributes, size: int) -> Image.Image:
    """The item's picture at `size` x `size` px (RGB): drawn at 4x, then reduced by a 4 x 4 box filter."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), attributes.background_rgb)
    # Pixel edges on the 4x canvas, right/bottom exclusive; Pillow's shapes include their last coordinate.
    x0, y0, x1, y1 = (int(round(v * big)) for v in attributes.box)
    draw = ImageDraw.Draw(image)
    fill = attributes.rgb
    if attributes.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif attributes.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # an isosceles triangle pointing up: base along the bottom of the box, apex at the top centre
        draw.polygon(((x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)), fill=fill)
    return image.reduce(_SUPERSAMPLE)


class ShapesDataset(Dataset):
    """`length` procedural items drawn from `seed`, rendered at `size` px (see the module docstring)."""

    def __init__(self, length: int = 1000, seed: int = 0, size: int = 64):
        if int(length) < 1 or int(size) < 8:
            raise Dalle2Error(f"the shapes dataset needs a length >= 1 and a size >= 8 px, got {length} and {size}; "
                              "pass larger values")
        self.length, self.seed, self.size = int(length), int(seed), int(size)

    def __len__(self) -> int:
        return self.length

    def _check(self, i: int) -> int:
        if not 0 <= i < self.length:
            raise IndexError(f"shapes item {i} out of range (the dataset has {self.length})")
        return int(i)

    def attributes(self, i: int) -> ShapeAttributes:
        return draw_attributes(self.seed, self._check(i))[0]

    def caption(self, i: int) -> str:
        return draw_attributes(self.seed, self._check(i))[1]

    def image(self, i: int, size: int | None = None):
        return render(self.attributes(i), size or self.size)

    def __getitem__(self, i: int) -> ShapeItem:
        attrs, caption = draw_attributes(self.seed, self._check(i))
        return ShapeItem(render(attrs, self.size), caption, attrs)

    def fingerprint(self) -> str:
        key = f"shapes:v{GENERATOR_VERSION}:seed={self.seed}:length={self.length}"
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"shapes (seed {self.seed}, {self.length} items, generator v{GENERATOR_VERSION})"
