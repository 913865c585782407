"""The segmentation data through the shared Loader: bad pairs skipped and counted, exact mid-epoch resume."""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import collect, write_seg_folder

from evamim.data.failures import TooManyBadSamples
from evamim.data.loader import Loader
from evamim.data.segmentation import SegDataConfig, SegLoader, build_seg_loader


def _cfg(root, **overrides) -> SegDataConfig:
    settings = dict(root=str(root), num_classes=2, reduce_zero_label=False, crop_size=16, train_scale=(32, 16),
                    num_workers=0, max_bad_fraction=0.5, bad_min_samples=1)
    settings.update(overrides)
    return SegDataConfig(**settings)


def _indices(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch["indices"]]


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return write_seg_folder(tmp_path_factory.mktemp("ade"))


@pytest.fixture
def corrupt_ade(tmp_path):
    """8 training pairs: image 2 truncated, label 5 not a PNG; validation image 1 empty."""
    root = write_seg_folder(tmp_path / "ade")
    image = root / "images" / "training" / "training_002.jpg"
    image.write_bytes(image.read_bytes()[:40])
    (root / "annotations" / "training" / "training_005.png").write_text("not a png")
    (root / "images" / "validation" / "validation_001.jpg").write_bytes(b"")
    return root


def test_the_segmentation_loader_is_the_shared_loader(ade):
    loader = build_seg_loader(_cfg(ade), "train", batch_size=2)
    assert isinstance(loader, Loader) and SegLoader is Loader
    batch = next(iter(loader))
    assert set(batch) == {"images", "labels", "indices"}  # no loader bookkeeping
    assert batch["images"].shape == (2, 3, 16, 16) and batch["labels"].shape == (2, 16, 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_or_label_is_skipped_counted_and_named(corrupt_ade, workers):
    loader = build_seg_loader(_cfg(corrupt_ade, num_workers=workers, shuffle=False), "train", batch_size=2)
    seen = collect(loader)
    assert sorted(int(i) for i in seen["indices"]) == [0, 1, 3, 4, 6, 7]
    failures = sorted(seen["failures"])
    assert len(failures) == 2
    assert failures[0].startswith(str(corrupt_ade / "annotations" / "training" / "training_005.png") + ": ")
    assert failures[1].startswith(str(corrupt_ade / "images" / "training" / "training_002.jpg") + ": ")
    assert loader.bad_sample_totals() == {"samples_tried": 8, "samples_bad": 2}

    evaluation = build_seg_loader(_cfg(corrupt_ade, num_workers=workers), "eval")
    seen = collect(evaluation)
    assert [int(i) for i in seen["indices"]] == [0, 2] and len(seen["failures"]) == 1
    assert "empty file" in seen["failures"][0]


def test_too_many_bad_pairs_stop_with_the_image_loaders_limits(corrupt_ade):
    strict = build_seg_loader(_cfg(corrupt_ade, max_bad_fraction=0.1, bad_min_samples=4, shuffle=False), "train",
                              batch_size=2)
    with pytest.raises(TooManyBadSamples, match="data.max_bad_fraction"):
        collect(strict)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        _cfg(corrupt_ade, max_bad_fraction=2.0)


def test_a_label_wrong_for_the_config_still_stops_the_run(ade):
    # Values 0 and 1 with num_classes=1: a setting to fix, not a broken file.
    with pytest.raises(ValueError, match="num_classes=1"):
        collect(build_seg_loader(_cfg(ade, num_classes=1), "train", batch_size=2))


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_yields_exactly_the_remaining_batches(corrupt_ade, workers):
    cfg = _cfg(corrupt_ade, num_workers=workers)
    full = list(build_seg_loader(cfg, "train", batch_size=2))
    first = build_seg_loader(cfg, "train", batch_size=2)
    iterator = iter(first)
    head = [next(iterator), next(iterator)]
    state = json.loads(json.dumps(first.state_dict()))  # plain types only
    resumed = build_seg_loader(cfg, "train", batch_size=2)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert _indices(head + tail) == _indices(full) and len(tail) == len(full) - 2
    for got, expected in zip(head + tail, full):
        assert torch.equal(got["images"], expected["images"]) and torch.equal(got["labels"], expected["labels"])
    assert resumed.epoch == 1 and resumed.bad_sample_totals() == {"samples_tried": 8, "samples_bad": 2}


def test_a_state_saved_by_the_former_segmentation_loader_still_resumes(ade):
    cfg = _cfg(ade)
    full = list(build_seg_loader(cfg, "train", batch_size=2))
    legacy = {"format": 1, "epoch": 0, "position": 4, "dataset_size": 8, "seed": 0}  # no kind, no shuffle
    resumed = build_seg_loader(cfg, "train", batch_size=2)
    resumed.load_state_dict(legacy)
    assert _indices(list(resumed)) == _indices(full[2:])
    with pytest.raises(ValueError, match="dataset_size 8 -> 3"):
        build_seg_loader(cfg, "eval").load_state_dict(legacy)
