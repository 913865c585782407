"""Loader batches hold per-sample entries only, and split_batch treats tensors and lists alike, strictly."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from data_fixtures import write_photo_folder

from evamim.data.config import DataConfig
from evamim.data.loader import build_loader
from evamim.engine.batching import infer_batch_size, split_batch


def test_split_batch_refuses_an_entry_whose_length_is_not_the_batch_size():
    batch = {"images": torch.zeros(4, 3), "keys": ["a", "b", "c", "d"], "bad_samples": ["x.jpg: truncated"]}
    with pytest.raises(ValueError, match=r"most hold 4 entries but batch\['bad_samples'\] has 1"):
        split_batch(batch, 2)
    with pytest.raises(ValueError, match=r"batch\['captions'\] has 3"):
        infer_batch_size({"images": torch.zeros(4, 3), "captions": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"batch\[1\] has 5"):
        infer_batch_size((torch.zeros(4), torch.zeros(5), torch.zeros(4)))


def test_split_batch_splits_lists_like_tensors_and_shares_scalars():
    Pair = namedtuple("Pair", "images labels")
    batch = {"x": torch.arange(4).view(4, 1), "keys": ["a", "b", "c", "d"], "pair": Pair(torch.zeros(4, 2), torch.ones(4)),
             "temperature": 0.07, "scale": torch.tensor(2.0)}
    first, second = split_batch(batch, 2)
    assert first["keys"] == ["a", "b"] and second["keys"] == ["c", "d"]
    assert second["x"].flatten().tolist() == [2, 3] and isinstance(first["pair"], Pair)
    assert first["temperature"] == second["temperature"] == 0.07 and second["scale"] is batch["scale"]
    assert infer_batch_size({"captions": ["a", "b"], "ids": (1, 2)}) == 2  # lists alone define it too


def test_loader_batches_with_bad_files_split_for_accumulation(tmp_path):
    write_photo_folder(tmp_path)  # five photos and three bad files
    cfg = DataConfig(source="folder", path=str(tmp_path), image_size=16, num_workers=0, labels=False,
                     max_bad_fraction=0.9, bad_min_samples=1, shuffle=False)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, drop_last=False)
    batches = list(loader)
    assert loader.bad_sample_totals()["samples_bad"] == 3
    for batch in batches:
        assert "bad_samples" not in batch and "num_bad" not in batch
        if infer_batch_size(batch) == 4:
            halves = split_batch(batch, 2)
            assert [len(half["indices"]) for half in halves] == [2, 2]
