"""data.samples_per_epoch counts all ranks together; without it, shards take their count from shard-info.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from evamim.data.config import DataConfig
from evamim.data.loader import build_loader
from evamim.data.shard_info import shard_set_size
from evamim.data.shard_writer import make_shards

RECIPES = Path(__file__).resolve().parents[1] / "src" / "evamim" / "recipes"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 samples in 6 shards of 4, with the shard-info.json that make_shards writes."""
    root = tmp_path_factory.mktemp("epoch")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for number in range(24):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "images" / f"{number:02d}.png")
    make_shards(root / "images", root / "shards", shard_size=4)
    return root / "shards"


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


def _cfg(folder: Path, **overrides) -> DataConfig:
    settings = dict(source="shards", path=str(folder), image_size=8, num_workers=0, shuffle_buffer=2)
    settings.update(overrides)
    return DataConfig(**settings)


@pytest.mark.parametrize("sampling", ["split", "resample"])
def test_samples_per_epoch_is_shared_by_the_ranks(shards, sampling):
    cfg = _cfg(shards, samples_per_epoch=13, shard_sampling=sampling)  # 13 over 2 ranks: 6 each, on both
    loaders = [build_loader(cfg, batch_size=2, rank=rank, world_size=2) for rank in range(2)]
    assert [len(loader) for loader in loaders] == [3, 3]
    assert [len(_keys(loader)) for loader in loaders] == [6, 6]
    alone = build_loader(cfg, batch_size=2, rank=0, world_size=1)
    assert len(alone) == 6 and len(_keys(alone)) == 12


def test_samples_per_epoch_below_the_world_size_is_refused(shards):
    with pytest.raises(ValueError, match="samples_per_epoch=3 counts all ranks together"):
        build_loader(_cfg(shards, samples_per_epoch=3), batch_size=1, rank=0, world_size=4)


def test_without_samples_per_epoch_the_shard_info_count_sets_the_epoch_length(shards):
    assert json.loads((shards / "shard-info.json").read_text())["num_samples"] == 24
    loaders = [build_loader(_cfg(shards), batch_size=2, rank=rank, world_size=2) for rank in range(2)]
    assert [len(loader) for loader in loaders] == [6, 6]  # 24 / 2 ranks / 2 per batch
    assert sorted(_keys(loaders[0]) + _keys(loaders[1])) == sorted(_keys(build_loader(_cfg(shards), batch_size=2,
                                                                                          rank=0, world_size=1)))
    resample = build_loader(_cfg(shards, shard_sampling="resample"), batch_size=4, rank=0, world_size=2)
    assert len(resample) == 3 and len(_keys(resample)) == 12  # the count is the resampled epoch too


def test_the_shard_info_count_covers_exactly_the_shards_given(shards, tmp_path):
    urls = sorted(str(path) for path in shards.glob("*.tar"))
    assert shard_set_size(urls) == 24 and shard_set_size(urls[:2]) == 8
    subset = _cfg(Path(f"{shards}/shard-{{000000..000002}}.tar"))
    assert len(build_loader(subset, batch_size=2, rank=0, world_size=1)) == 6
    # Shards without an info file (or not all listed in it): the length stays unknown, as before.
    (tmp_path / "copy").mkdir()
    for url in urls[:2]:
        (tmp_path / "copy" / Path(url).name).write_bytes(Path(url).read_bytes())
    unknown = build_loader(_cfg(tmp_path / "copy"), batch_size=2, rank=0, world_size=1)
    with pytest.raises(TypeError, match="samples_per_epoch"):
        len(unknown)
    with pytest.raises(ValueError, match="resample needs the length of an epoch"):
        build_loader(_cfg(tmp_path / "copy", shard_sampling="resample"), batch_size=2, rank=0, world_size=1)
    assert shard_set_size([f"pipe:cat {urls[0]}"]) is None


def test_the_paper_recipe_counts_merged_30m_over_all_ranks():
    recipe = yaml.safe_load((RECIPES / "pretrain" / "eva_g14_merged30m.yaml").read_text())
    assert recipe["data"]["samples_per_epoch"] == 29_600_000
