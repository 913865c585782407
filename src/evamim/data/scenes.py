"""Synthetic scenes: several objects of one shape per image, each its own colour, one per grid cell.

The world ``evamim demo`` is built on (``data.synthetic_world=scenes``). An image of ``resolution`` pixels is
cut into a ``grid`` x ``grid`` board of cells; 1 to ``grid**2`` cells (uniformly many) each hold one object,
centred in its cell, upright, 72-92% of the cell wide. Every object in an image has the image's shape (its
label, an index into this module's ``SHAPES``) and a colour of its own, over a plain black or gray background.
The caption names each object in reading order: "a red star, a blue star and a white star on a black
background".

Why this world and not ``SyntheticShapes``'s single rotated, textured shape anywhere in the image: there a
small ViT does not learn the shape in a CPU budget even with labels (supervised, 4 blocks, 8-pixel patches:
chance after 300 steps, 19-30% after 1,500 even on large solid shapes), so no CLIP on its captions can.
Here, at 64 pixels with 16-pixel patches, each object covers 2 x 2 patches whose content already tells the
shape: the same ViT, supervised, is at 100% after 400 steps, and a CLIP on the captions reaches ~80%
zero-shot in a few hundred.
A masked patch's shape can be read from the object's other patches and from the other objects, while its
colour changes from object to object: the patch-level targets EVA's masked prediction needs. Labels are per
image (the shape) and per object (``SceneInfo.objects``: colour, cell, centre, radius; ``draw`` also returns
which object each pixel belongs to). Details and measurements: docs/demo.md.

Image ``i`` is a pure function of ``(seed, i, resolution, grid)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from evamim.data.synthetic import COLOURS, DrawnSource, draw_shape

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
"""``SyntheticShapes``'s eight less the hexagon, which at this size is told from a circle by a few pixels only."""
SCENE_COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SCENE_BACKGROUNDS = ("black", "gray")
RADIUS_RANGE = (0.36, 0.46)  # outer radius / cell side
SUPERSAMPLING = 4  # drawn 4x larger and box-filtered down: anti-aliased edges

SCENE_TEMPLATES = tuple(f"a {colour} {{}} on a {background} background"
                        for colour in SCENE_COLOURS for background in SCENE_BACKGROUNDS)
"""Zero-shot prompts in the captions' own words, one per (colour, background): the prompt ensemble for
this world, as CLIP uses one per benchmark (``{}`` is the shape)."""


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object: its colour name, grid cell (row, column), centre and outer radius in image pixels."""

    colour: str
    cell: tuple[int, int]
    center: tuple[float, float]
    radius: float


@dataclasses.dataclass(frozen=True)
class SceneInfo:
    """What one scene shows: the shape every object has, the background colour, the objects (reading order)."""

    shape: str
    background: str
    objects: tuple[SceneObject, ...]

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def caption(self) -> str:
        names = [f"a {item.colour} {self.shape}" for item in self.objects]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on a {self.background} background"


class SyntheticScenes(DrawnSource):
    """Map-style source of ``size`` scenes of ``resolution`` x ``resolution`` pixels on a ``grid`` x ``grid``
    board (same interface as ``SyntheticShapes``: ``load``, ``info``, ``draw``, ``classes``)."""

    classes = list(SHAPES)

    def __init__(self, size: int = 10_000, resolution: int = 64, seed: int = 0, grid: int = 2):
        if size < 1 or grid < 1 or resolution < 8 * grid:
            raise ValueError(f"synthetic scenes need size >= 1, grid >= 1 and resolution >= 8 x grid, "
                             f"got size {size}, resolution {resolution}, grid {grid}")
        self.size = size
        self.resolution = resolution
        self.seed = seed
        self.grid = grid
        self.origin = f"scenes(seed={seed}, resolution={resolution}, grid={grid})"

    def info(self, index: int) -> SceneInfo:
        """What scene ``index`` shows, without drawing it."""
        self._check(index)
        return _plan(np.random.default_rng([self.seed, index]), self.resolution, self.grid)

    def draw(self, index: int) -> tuple[Image.Image, Image.Image, SceneInfo]:
        """(RGB image, "L" object map: 0 = background, k + 1 = pixels of ``info.objects[k]``, description)."""
        info = self.info(index)
        side, scale = self.resolution, SUPERSAMPLING
        background = COLOURS[info.background]
        canvas = Image.new("RGB", (side * scale, side * scale), background)
        pen = ImageDraw.Draw(canvas)
        objects = Image.new("L", (side, side), 0)
        marker = ImageDraw.Draw(objects)
        for k, item in enumerate(info.objects):
            center = (item.center[0] * scale, item.center[1] * scale)
            draw_shape(pen, info.shape, center, item.radius * scale, fill=COLOURS[item.colour], hole=background)
            draw_shape(marker, info.shape, item.center, item.radius, fill=k + 1, hole=0)
        return canvas.resize((side, side), Image.BOX), objects, info

    def _check(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic scene index {index} out of range [0, {self.size})")


def _plan(rng: np.random.Generator, side: int, grid: int) -> SceneInfo:
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = SCENE_BACKGROUNDS[rng.integers(len(SCENE_BACKGROUNDS))]
    count = int(rng.integers(1, grid * grid + 1))
    cells = sorted(int(c) for c in rng.permutation(grid * grid)[:count])
    cell_side = side / grid
    objects = []
    for cell in cells:
        row, column = divmod(cell, grid)
        objects.append(SceneObject(
            colour=SCENE_COLOURS[rng.integers(len(SCENE_COLOURS))],
            cell=(row, column),
            center=((column + 0.5) * cell_side, (row + 0.5) * cell_side),
            radius=float(rng.uniform(*RADIUS_RANGE)) * cell_side,
        ))
    return SceneInfo(shape=shape, background=background, objects=tuple(objects))
