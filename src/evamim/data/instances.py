"""Synthetic instances for detection and instance segmentation, written as a COCO-format dataset.

Each image shows 1 to ``max_objects`` upright shapes (the categories: ``evamim.data.scenes.SHAPES``), each its
own shape and colour (``SCENE_COLOURS``), of outer radius ``radius_range`` x the image side, anywhere in the
image without touching another, over a plain black or gray background; shapes are drawn 4x larger and
box-filtered down (anti-aliased edges). The instance mask of an object is the set of pixels whose centre lies
inside its outline (a ring's hole excluded); its box is the tight box of that mask, so boxes and masks agree
exactly. Image ``i`` of a split is a pure function of ``(seed, i, resolution, max_objects, radius_range)``.

``write_instances(out, ...)`` writes the layout ``evamim detect`` reads (the COCO one)::

    out/images/train/000000.png ...          out/annotations/instances_train.json
    out/images/val/000000.png ...            out/annotations/instances_val.json

Annotations: ``bbox`` [x, y, w, h] in pixels, ``segmentation`` as COCO RLE (``{"size": [h, w], "counts": str}``),
``area`` = mask pixels, ``iscrowd`` 0; categories 1..8 in ``SHAPES`` order. ``evamim data make-instances``
is the command.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from evamim import atomic
from evamim.data.scenes import SCENE_BACKGROUNDS, SCENE_COLOURS, SHAPES, SUPERSAMPLING
from evamim.data.synthetic import COLOURS, draw_shape

PLACEMENT_TRIES = 50  # per object; an object that finds no free place is left out


@dataclasses.dataclass(frozen=True)
class Instance:
    """One drawn object: its category (shape), colour, centre and outer radius in pixels."""

    shape: str
    colour: str
    center: tuple[float, float]
    radius: float

    @property
    def category_id(self) -> int:
        return SHAPES.index(self.shape) + 1


class SyntheticInstances:
    """``size`` images of ``resolution`` x ``resolution`` pixels; ``draw(i)`` -> (RGB image, "L" instance map:
    0 = background, k + 1 = the pixels of ``instances[k]``, the instances)."""

    def __init__(self, size: int, resolution: int = 128, seed: int = 0, max_objects: int = 6,
                 radius_range: tuple[float, float] = (0.08, 0.18)):
        low, high = radius_range
        if size < 1 or resolution < 16 or max_objects < 1:
            raise ValueError(f"synthetic instances need size >= 1, resolution >= 16 and max_objects >= 1, got "
                             f"size {size}, resolution {resolution}, max_objects {max_objects}")
        if not 0 < low <= high <= 0.5:
            raise ValueError(f"radius_range must satisfy 0 < low <= high <= 0.5 (fractions of the side), got "
                             f"{tuple(radius_range)}")
        self.size, self.resolution, self.seed = size, resolution, seed
        self.max_objects, self.radius_range = max_objects, (float(low), float(high))

    def plan(self, index: int) -> tuple[str, tuple[Instance, ...]]:
        """(background colour, instances) of image ``index``, without drawing it."""
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic instance image {index} out of range [0, {self.size})")
        rng = np.random.default_rng([self.seed, index])
        side = self.resolution
        background = SCENE_BACKGROUNDS[rng.integers(len(SCENE_BACKGROUNDS))]
        placed: list[Instance] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = SCENE_COLOURS[rng.integers(len(SCENE_COLOURS))]
            radius = float(rng.uniform(*self.radius_range)) * side
            for _ in range(PLACEMENT_TRIES):
                center = (float(rng.uniform(radius, side - radius)), float(rng.uniform(radius, side - radius)))
                if all(math.dist(center, other.center) > radius + other.radius + 1 for other in placed):
                    placed.append(Instance(shape, colour, center, radius))
                    break
        return background, tuple(placed)

    def draw(self, index: int) -> tuple[Image.Image, Image.Image, tuple[Instance, ...]]:
        background, instances = self.plan(index)
        side, scale = self.resolution, SUPERSAMPLING
        canvas = Image.new("RGB", (side * scale, side * scale), COLOURS[background])
        pen = ImageDraw.Draw(canvas)
        marks = Image.new("L", (side, side), 0)
        marker = ImageDraw.Draw(marks)
        for k, item in enumerate(instances):
            center = (item.center[0] * scale, item.center[1] * scale)
            draw_shape(pen, item.shape, center, item.radius * scale, fill=COLOURS[item.colour],
                       hole=COLOURS[background])
            draw_shape(marker, item.shape, item.center, item.radius, fill=k + 1, hole=0)
        return canvas.resize((side, side), Image.BOX), marks, instances


def mask_annotation(mask: np.ndarray) -> dict:
    """A binary (h, w) mask -> the COCO annotation fields ``bbox`` (tight, [x, y, w, h]), ``area`` (pixels) and
    ``segmentation`` (RLE with a str ``counts``, as COCO's JSON stores it)."""
    from pycocotools import mask as mask_utils

    rows, cols = np.nonzero(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    x0, y0 = int(cols.min()), int(rows.min())
    return {"bbox": [x0, y0, int(cols.max()) + 1 - x0, int(rows.max()) + 1 - y0], "area": int(mask.sum()),
            "segmentation": rle, "iscrowd": 0}


def categories() -> list[dict]:
    return [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]


def write_split(out: Path, split: str, source: SyntheticInstances) -> dict:
    """Draw every image of ``source`` into ``out/images/<split>/`` and write
    ``out/annotations/instances_<split>.json``; returns a summary (images, instances, files)."""
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(source.size):
        image, marks, instances = source.draw(index)
        name = f"{index:06d}.png"
        image.save(image_dir / name)
        images.append({"id": index + 1, "file_name": name, "width": image.width, "height": image.height})
        labels = np.asarray(marks)
        for k, item in enumerate(instances):
            mask = labels == k + 1
            if not mask.any():  # too small to cover a pixel centre: not an instance anyone could mark
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": item.category_id,
                                **mask_annotation(mask)})
    annotation_file = out / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    info = {"description": f"evamim synthetic instances ({split})", "resolution": source.resolution,
            "seed": source.seed, "max_objects": source.max_objects, "radius_range": list(source.radius_range)}
    atomic.write_text(annotation_file, json.dumps({"info": info, "images": images, "annotations": annotations,
                                                   "categories": categories()}))
    return {"split": split, "images": len(images), "instances": len(annotations),
            "image_dir": str(image_dir), "annotations": str(annotation_file)}


def remove_split(out: str | Path, split: str) -> None:
    """Delete what :func:`write_split` wrote for ``split`` under ``out`` (its images and its JSON), if anything."""
    import shutil

    out = Path(out)
    shutil.rmtree(out / "images" / split, ignore_errors=True)
    (out / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)


def write_instances(out: str | Path, train: int = 1000, val: int = 200, resolution: int = 128, seed: int = 0,
                    max_objects: int = 6, radius_range: tuple[float, float] = (0.08, 0.18)) -> list[dict]:
    """Write the train split (seed ``seed``) and the val split (seed ``seed + 1``: other images) under ``out``
    (see the module docstring); a split of 0 images is not written. Returns one summary per split."""
    out = Path(out)
    summaries = []
    for split, count, split_seed in (("train", train, seed), ("val", val, seed + 1)):
        if count:
            source = SyntheticInstances(count, resolution, split_seed, max_objects, radius_range)
            summaries.append(write_split(out, split, source))
    return summaries


__all__ = ["Instance", "SyntheticInstances", "categories", "mask_annotation", "remove_split", "write_instances",
           "write_split"]
