"""Procedurally drawn images with a caption and a class label: data that needs no files.

Each image shows one shape (circle, square, triangle, star, hexagon, cross, diamond or ring) of a
named colour, size and surface texture, placed anywhere and rotated, over a textured background of
another colour. The caption says what was drawn ("a large red striped star at the top left on a
checkered blue background"); the label is the shape's index in ``SHAPES``. Image ``i`` is a pure
function of ``(seed, i, resolution)``, so every worker, rank and rerun draws the same picture.

Textures use two tones of the same named colour (the second a lighter or darker shade that is
still nearest to that colour), so the colour word stays the dominant colour of its region.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from evamim.data.samples import RawSample

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 130, 25),
    "purple": (135, 55, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "pink": (240, 130, 190),
    "cyan": (40, 200, 210),
    "brown": (120, 75, 35),
}
SIZES = {"small": (0.10, 0.16), "medium": (0.18, 0.26), "large": (0.28, 0.40)}  # radius / image side
SHAPE_TEXTURES = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient", "noisy")
# Shape and background colours must be told apart by eye and by a nearest-colour test.
MIN_COLOUR_DISTANCE = 110.0


@dataclasses.dataclass(frozen=True)
class ShapeInfo:
    """What image ``index`` shows; ``center`` and ``radius`` in pixels of the drawn image."""

    shape: str
    colour: str
    size: str
    texture: str
    background: str
    background_colour: str
    center: tuple[float, float]
    radius: float
    rotation: float
    position: str

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def caption(self) -> str:
        texture = "" if self.texture == "solid" else f"{self.texture} "
        return (
            f"a {self.size} {self.colour} {texture}{self.shape} {self.position} "
            f"on a {self.background} {self.background_colour} background"
        )


class DrawnSource:
    """What the synthetic worlds share: a map-style source of ``size`` drawn images, each with a caption and a
    label; subclasses set ``size`` and ``origin`` and define ``draw(index) -> (image, mask, info)``, where
    ``info`` has ``label`` and ``caption``."""

    has_labels = True
    has_captions = True
    size: int
    origin: str

    def __len__(self) -> int:
        return self.size

    def describe(self, index: int) -> str:
        return f"{self.origin}[{index}]"

    def load(self, index: int, decode: object = None) -> RawSample:
        image, _, info = self.draw(index)
        return RawSample(image, label=info.label, caption=info.caption)

    def draw(self, index: int) -> tuple[Image.Image, Image.Image, object]:
        raise NotImplementedError


class SyntheticShapes(DrawnSource):
    """Map-style source of ``size`` drawn images of ``resolution`` x ``resolution`` pixels."""

    classes = list(SHAPES)

    def __init__(self, size: int = 10_000, resolution: int = 96, seed: int = 0):
        if size < 1 or resolution < 8:
            raise ValueError(f"synthetic source needs size >= 1 and resolution >= 8, got {size}, {resolution}")
        self.size = size
        self.resolution = resolution
        self.seed = seed
        self.origin = f"synthetic(seed={seed}, resolution={resolution})"

    def info(self, index: int) -> ShapeInfo:
        """What image ``index`` shows, without drawing it."""
        return _plan(np.random.default_rng([self.seed, index]), self.resolution)

    def draw(self, index: int) -> tuple[Image.Image, Image.Image, ShapeInfo]:
        """(RGB image, "L" mask of the shape's pixels (255 = shape), description)."""
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic index {index} out of range [0, {self.size})")
        rng = np.random.default_rng([self.seed, index])
        info = _plan(rng, self.resolution)
        side = self.resolution
        background = _texture(info.background, COLOURS[info.background_colour], side, rng)
        fill = _texture(info.texture, _jitter(COLOURS[info.colour], rng), side, rng)
        mask = Image.new("L", (side, side), 0)
        _draw_shape(ImageDraw.Draw(mask), info)
        background.paste(fill, mask=mask)
        return background, mask, info


def _plan(rng: np.random.Generator, side: int) -> ShapeInfo:
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = names[rng.integers(len(names))]
    allowed = [name for name in names if _distance(COLOURS[name], COLOURS[colour]) >= MIN_COLOUR_DISTANCE]
    background_colour = allowed[rng.integers(len(allowed))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high)) * side
    center = (float(rng.uniform(radius, side - radius)), float(rng.uniform(radius, side - radius)))
    return ShapeInfo(
        shape=shape,
        colour=colour,
        size=size,
        texture=SHAPE_TEXTURES[rng.integers(len(SHAPE_TEXTURES))],
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        background_colour=background_colour,
        center=center,
        radius=radius,
        rotation=float(rng.uniform(0, 360)),
        position=_position_words(center, side),
    )


def _position_words(center: tuple[float, float], side: int) -> str:
    column = ("left", "center", "right")[min(2, int(3 * center[0] / side))]
    row = ("top", "middle", "bottom")[min(2, int(3 * center[1] / side))]
    if row == "middle" and column == "center":
        return "in the center"
    if row == "middle":
        return f"on the {column}"
    if column == "center":
        return f"at the {row}"
    return f"at the {row} {column}"


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def nearest_colour(rgb: tuple[float, float, float] | np.ndarray) -> str:
    """Name of the palette colour nearest to ``rgb`` (Euclidean in RGB)."""
    return min(COLOURS, key=lambda name: _distance(COLOURS[name], tuple(rgb)))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(value + rng.integers(-12, 13), 0, 255)) for value in rgb)


@functools.lru_cache(maxsize=8192)
def _second_tone(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A shade of ``rgb`` (darker for light colours, lighter for dark ones) still nearest to it."""
    target = (0, 0, 0) if sum(rgb) > 300 else (255, 255, 255)
    for mix in (0.3, 0.2, 0.1):
        shade = tuple(int(round(c + (t - c) * mix)) for c, t in zip(rgb, target))
        if nearest_colour(shade) == nearest_colour(rgb):
            return shade
    return rgb


@functools.lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    return y, x


def _texture(kind: str, rgb: tuple[int, int, int], side: int, rng: np.random.Generator) -> Image.Image:
    """A ``side`` x ``side`` RGB image of the pattern ``kind`` in two tones of ``rgb``."""
    if kind in ("plain", "solid"):
        return Image.new("RGB", (side, side), tuple(rgb))
    tone = _second_tone(rgb)
    y, x = _grid(side)
    period = float(rng.uniform(0.08, 0.2)) * side
    if kind == "striped":
        angle = float(rng.choice([0.0, 45.0, 90.0, 135.0])) * math.pi / 180
        phase = (x * math.cos(angle) + y * math.sin(angle)) * (1.0 / period)
        second = (phase - np.floor(phase)) < 0.4  # the second tone covers less than half: the named colour dominates
    elif kind == "checkered":
        second = (np.floor(x * (1.0 / period)) + np.floor(y * (1.0 / period))) % 2 == 1
    elif kind == "dotted":
        cx = x * (1.0 / period)
        cy = y * (1.0 / period)
        cx -= np.floor(cx) + 0.5
        cy -= np.floor(cy) + 0.5
        second = cx * cx + cy * cy < 0.09
    elif kind == "gradient":
        angle = float(rng.uniform(0, 2 * math.pi))
        ramp = x * math.cos(angle) + y * math.sin(angle)
        ramp -= ramp.min()
        ramp *= 1.0 / max(float(ramp.max()), 1e-6)
        pixels = np.array(rgb, np.float32) + (np.array(tone, np.float32) - np.array(rgb, np.float32)) * ramp[..., None]
        return Image.fromarray(pixels.astype(np.uint8), "RGB")
    elif kind == "noisy":
        # Noise drawn at a quarter of the resolution and upscaled: a grainy look at a fraction of the cost.
        small = max(2, side // 4)
        noise = rng.standard_normal((small, small, 3), dtype=np.float32) * 14.0 + np.array(rgb, np.float32)
        grain = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
        return grain.resize((side, side), Image.NEAREST)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    pixels = np.empty((side, side, 3), np.uint8)
    pixels[...] = rgb
    pixels[second] = tone
    return Image.fromarray(pixels, "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, info: ShapeInfo) -> None:
    draw_shape(draw, info.shape, info.center, info.radius, info.rotation)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], radius: float,
               rotation: float = 0.0, fill: int | tuple[int, int, int] = 255,
               hole: int | tuple[int, int, int] = 0) -> None:
    """Draw ``shape`` (one of ``SHAPES``, or ``heart``) centred at ``center`` with outer radius ``radius`` pixels, rotated by
    ``rotation`` degrees, in ``fill``; a ring's hole is painted ``hole`` (the background's value)."""
    cx, cy = center
    r = radius
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=hole)
    elif shape in ("square", "triangle", "hexagon"):
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        draw.regular_polygon((cx, cy, r), sides, rotation=rotation, fill=fill)
    else:
        outline = {"star": _star, "cross": _cross, "diamond": _diamond, "heart": _heart}[shape]()
        angle = math.radians(rotation)
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + r * (px * cos - py * sin), cy + r * (px * sin + py * cos)) for px, py in outline]
        draw.polygon(points, fill=fill)


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.45
        angle = math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), -radius * math.sin(angle)))
    return points


def _cross() -> list[tuple[float, float]]:
    a = 0.33  # half the arm width
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _diamond() -> list[tuple[float, float]]:
    return [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]


def _heart() -> list[tuple[float, float]]:
    """The classic parametric heart (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), in [-1, 1]."""
    points = []
    for k in range(32):
        t = 2 * math.pi * k / 32
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17, -y / 17 - 0.05))
    return points
