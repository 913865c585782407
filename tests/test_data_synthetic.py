"""The synthetic source: deterministic, varied, and its captions and labels say what was drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evamim.data.config import DataConfig
from evamim.data.loader import build_loader
from evamim.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, SIZES, SyntheticShapes, nearest_colour

# Shape area / radius^2 for the outlines drawn (circumradius r).
AREA_RATIO = {
    "circle": math.pi,
    "ring": math.pi * (1 - 0.55**2),
    "square": 2.0,
    "hexagon": 1.5 * math.sqrt(3),
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * 0.45 * math.sin(math.radians(36)),
    "cross": 4 * 0.33 * 2 - (2 * 0.33) ** 2,
    "diamond": 2 * 0.62,
}


def test_same_seed_and_index_draw_the_same_image_and_other_seeds_do_not():
    a, b, c = SyntheticShapes(50, 48, seed=1), SyntheticShapes(50, 48, seed=1), SyntheticShapes(50, 48, seed=2)
    for index in (0, 7, 49):
        assert np.array_equal(np.asarray(a.draw(index)[0]), np.asarray(b.draw(index)[0]))
        assert a.info(index) == b.info(index)
    assert not all(np.array_equal(np.asarray(a.draw(i)[0]), np.asarray(c.draw(i)[0])) for i in range(5))


@pytest.mark.parametrize("resolution", [8, 33, 160])
def test_any_resolution(resolution):
    image, mask, _ = SyntheticShapes(4, resolution, seed=0).draw(3)
    assert image.size == mask.size == (resolution, resolution) and image.mode == "RGB"


def _dominant_colour(pixels: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :].astype(np.float32) - palette[None]) ** 2).sum(-1), axis=1)
    return names[np.bincount(nearest, minlength=len(names)).argmax()]


def test_captions_and_labels_match_the_drawn_content():
    source = SyntheticShapes(200, 256, seed=3)
    for index in range(48):
        image, mask, info = source.draw(index)
        pixels = np.asarray(image).reshape(-1, 3)
        inside = np.asarray(mask).reshape(-1) > 0
        # The colour word is the dominant colour of the shape's pixels, the background's outside it.
        assert _dominant_colour(pixels[inside]) == info.colour, (index, info)
        assert _dominant_colour(pixels[~inside]) == info.background_colour, (index, info)
        # The drawn shape is the one the label names: its area matches that outline's area ...
        area = inside.sum() / info.radius**2
        assert area == pytest.approx(AREA_RATIO[info.shape], rel=0.1), (index, info.shape, area)
        # ... and a ring, unlike every other shape, leaves its centre empty.
        centre = np.asarray(mask)[int(info.center[1]), int(info.center[0])] > 0
        assert centre == (info.shape != "ring"), (index, info.shape)
        assert info.label == SHAPES.index(info.shape)
        words = info.caption.split()
        assert words[:3] == ["a", info.size, info.colour] and info.shape in words
        assert f"{info.background} {info.background_colour} background" in info.caption
        low, high = SIZES[info.size]
        assert low * 256 <= info.radius <= high * 256
    assert nearest_colour((250, 20, 20)) == "red"


def test_images_are_varied():
    source = SyntheticShapes(300, 32, seed=0)
    infos = [source.info(i) for i in range(300)]
    assert {i.shape for i in infos} == set(SHAPES)
    assert {i.colour for i in infos} == set(COLOURS)
    assert {i.background for i in infos} == set(BACKGROUNDS)
    assert {i.size for i in infos} == set(SIZES)
    assert len({i.position for i in infos}) == 9
    assert len({i.caption for i in infos}) > 250
    images = {np.asarray(source.draw(i)[0]).tobytes() for i in range(100)}
    assert len(images) == 100


def test_loader_delivers_synthetic_labels_and_captions_of_the_drawn_images():
    cfg = DataConfig(image_size=32, synthetic_size=12, synthetic_resolution=48, labels=True, captions=True, num_workers=0, seed=5)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1)
    source = SyntheticShapes(12, 48, seed=5)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 32, 32)
    for index, label, caption in zip(batch["indices"].tolist(), batch["labels"].tolist(), batch["captions"]):
        assert label == source.info(index).label and caption == source.info(index).caption
