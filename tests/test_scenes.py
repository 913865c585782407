"""The synthetic scenes world (data.synthetic_world=scenes): what is drawn is what the caption and labels say."""

from __future__ import annotations

import numpy as np
import pytest

from evamim.data.config import DataConfig
from evamim.data.scenes import SCENE_BACKGROUNDS, SCENE_COLOURS, SCENE_TEMPLATES, SHAPES, SyntheticScenes
from evamim.data.sources import build_source
from evamim.data.synthetic import COLOURS


def test_a_scene_is_a_pure_function_of_seed_and_index():
    a, b, other = SyntheticScenes(50, 64, seed=3), SyntheticScenes(50, 64, seed=3), SyntheticScenes(50, 64, seed=4)
    assert np.array_equal(np.asarray(a.draw(7)[0]), np.asarray(b.draw(7)[0]))
    assert a.info(7) == b.info(7)
    assert not all(np.array_equal(np.asarray(a.draw(i)[0]), np.asarray(other.draw(i)[0])) for i in range(5))


def test_objects_are_where_the_description_says_in_the_colour_it_names():
    scenes = SyntheticScenes(40, 64, seed=0)
    for index in range(40):
        image, objects, info = scenes.draw(index)
        pixels, owner = np.asarray(image).astype(int), np.asarray(objects)
        assert 1 <= len(info.objects) <= 4
        assert len({item.cell for item in info.objects}) == len(info.objects)
        assert set(np.unique(owner)) == set(range(len(info.objects) + 1))
        background = np.array(COLOURS[info.background])
        assert np.abs(pixels[owner == 0] - background).sum(-1).mean() < 12  # anti-aliased edges aside
        for k, item in enumerate(info.objects):
            row, column = item.cell
            inside = owner == k + 1
            ys, xs = np.nonzero(inside)
            assert row * 32 <= ys.min() and ys.max() < (row + 1) * 32 and column * 32 <= xs.min() and xs.max() < (column + 1) * 32
            colours = pixels[inside]
            exact = np.abs(colours - np.array(COLOURS[item.colour])).sum(-1) < 6
            assert exact.mean() > 0.6, (index, k, item.colour)


def test_caption_names_every_object_with_the_shape_and_the_background():
    scenes = SyntheticScenes(30, 64, seed=1)
    for index in range(30):
        info = scenes.info(index)
        sample = scenes.load(index)
        assert sample.caption == info.caption and sample.label == SHAPES.index(info.shape)
        assert info.caption.count(f" {info.shape}") == len(info.objects)
        assert info.caption.endswith(f"on a {info.background} background")
        for item in info.objects:
            assert f"a {item.colour} {info.shape}" in info.caption
    assert scenes.info(0).caption.startswith("a ")


def test_every_shape_colour_background_and_count_occurs():
    infos = [SyntheticScenes(400, 64, seed=0).info(i) for i in range(400)]
    assert {info.shape for info in infos} == set(SHAPES)
    assert {item.colour for info in infos for item in info.objects} == set(SCENE_COLOURS)
    assert {info.background for info in infos} == set(SCENE_BACKGROUNDS)
    assert {len(info.objects) for info in infos} == {1, 2, 3, 4}


def test_zero_shot_templates_are_caption_shaped():
    assert len(SCENE_TEMPLATES) == len(SCENE_COLOURS) * len(SCENE_BACKGROUNDS)
    assert SCENE_TEMPLATES[0].format("star") == "a red star on a black background"


def test_out_of_range_index_and_too_small_resolution_are_refused():
    with pytest.raises(IndexError, match="out of range"):
        SyntheticScenes(5, 64).draw(5)
    with pytest.raises(ValueError, match="resolution >= 8 x grid"):
        SyntheticScenes(5, 12)


def test_data_config_selects_the_world_and_refuses_unknown_ones():
    source = build_source(DataConfig(synthetic_world="scenes", synthetic_resolution=64, synthetic_size=10))
    assert isinstance(source, SyntheticScenes) and len(source) == 10 and source.classes == list(SHAPES)
    with pytest.raises(ValueError, match="synthetic_world.*shapes.*scenes"):
        DataConfig(synthetic_world="scene")
    with pytest.raises(ValueError, match="synthetic_resolution must be >= 16"):
        DataConfig(synthetic_world="scenes", synthetic_resolution=8)
