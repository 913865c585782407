"""Loader: batch contents, per-sample masks, ranks, and exact mid-epoch resume for map-style data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import RandomPatchMask

from evamim.data.collate import Collator
from evamim.data.config import DataConfig
from evamim.data.loader import build_loader
from evamim.data.sampler import ResumableDistributedSampler


def _cfg(**overrides) -> DataConfig:
    settings = dict(image_size=16, synthetic_size=48, synthetic_resolution=24, num_workers=0, seed=3)
    settings.update(overrides)
    return DataConfig(**settings)


def _loader(cfg: DataConfig, batch_size: int = 4, rank: int = 0, world_size: int = 1, **kwargs):
    return build_loader(cfg, batch_size=batch_size, mask_generator=RandomPatchMask(16, 6), rank=rank, world_size=world_size, **kwargs)


def _take(loader, batches: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if batches is not None and len(out) == batches:
            break
    return out


def _by_index(batches: list[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {
        int(i): (image, mask)
        for batch in batches
        for i, image, mask in zip(batch["indices"], batch["images"], batch["masks"])
    }


def test_batch_dict_has_the_documented_keys_shapes_and_types():
    cfg = _cfg(labels=True, captions=True)
    batch = next(iter(_loader(cfg)))
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["masks"].shape == (4, 16) and batch["masks"].dtype == torch.bool
    assert batch["masks"].sum(1).tolist() == [6, 6, 6, 6]
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (4,)
    assert isinstance(batch["captions"], list) and len(batch["captions"]) == 4
    assert batch["indices"].dtype == torch.long
    assert set(batch) == {"images", "masks", "labels", "captions", "indices"}  # no loader bookkeeping
    assert "masks" not in next(iter(build_loader(cfg, batch_size=4, rank=0, world_size=1)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_k_batches_yields_exactly_the_rest_of_the_epoch_with_the_same_crops_and_masks(workers):
    cfg = _cfg(num_workers=workers)
    full = _take(_loader(cfg))
    full_order = [int(i) for batch in full for i in batch["indices"]]
    assert sorted(full_order) == list(range(48))

    first = _loader(cfg)
    head = _take(first, batches=5)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 20

    resumed = _loader(cfg)
    resumed.load_state_dict(state)
    tail = _take(resumed)
    order = [int(i) for batch in head + tail for i in batch["indices"]]
    assert order == full_order  # nothing repeated, nothing skipped, same order
    expected, got = _by_index(full), _by_index(head + tail)
    for index, (image, mask) in expected.items():
        assert torch.equal(got[index][0], image) and torch.equal(got[index][1], mask)
    assert resumed.epoch == 1  # the epoch finished, the next one is queued


def test_breaking_out_and_iterating_again_continues_the_same_epoch():
    loader = _loader(_cfg())
    head = _take(loader, batches=3)
    rest = _take(loader)
    indices = [int(i) for batch in head + rest for i in batch["indices"]]
    assert sorted(indices) == list(range(48)) and loader.epoch == 1
    next_epoch = [int(i) for batch in _take(loader) for i in batch["indices"]]
    assert sorted(next_epoch) == list(range(48)) and next_epoch != indices


def test_masks_and_crops_depend_on_the_sample_only_not_on_batching_or_workers():
    a = _by_index(_take(_loader(_cfg(), batch_size=4)))
    b = _by_index(_take(_loader(_cfg(num_workers=2), batch_size=6)))
    assert a.keys() == b.keys()
    for index in a:
        assert torch.equal(a[index][0], b[index][0]) and torch.equal(a[index][1], b[index][1])
    masks = torch.stack([a[i][1] for i in sorted(a)])
    assert len({tuple(row.tolist()) for row in masks}) > 40  # and they differ between samples


def test_masks_change_between_epochs_and_seeds():
    loader = _loader(_cfg())
    epoch0 = _by_index(_take(loader))
    epoch1 = _by_index(_take(loader))
    other_seed = _by_index(_take(_loader(_cfg(seed=4))))
    assert sum(torch.equal(epoch0[i][1], epoch1[i][1]) for i in epoch0) < 10
    assert sum(torch.equal(epoch0[i][1], other_seed[i][1]) for i in epoch0) < 10


def test_two_ranks_split_the_epoch_and_resume_exactly_even_on_another_world_size():
    cfg = _cfg()
    ranks = [_loader(cfg, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    full = [[int(i) for b in _take(loader) for i in b["indices"]] for loader in [_loader(cfg, rank=r, world_size=2) for r in range(2)]]
    assert not set(full[0]) & set(full[1]) and sorted(full[0] + full[1]) == list(range(48))

    heads = [[int(i) for b in _take(loader, batches=2) for i in b["indices"]] for loader in ranks]
    states = [loader.state_dict() for loader in ranks]
    assert states[0] == states[1] and states[0]["position"] == 16
    # Same world size: each rank continues its own share.
    for rank in range(2):
        resumed = _loader(cfg, rank=rank, world_size=2)
        resumed.load_state_dict(states[0])
        tail = [int(i) for b in _take(resumed) for i in b["indices"]]
        assert heads[rank] + tail == full[rank]
    # One rank now: it takes exactly the samples no rank consumed yet.
    single = _loader(cfg)
    single.load_state_dict(states[0])
    rest = [int(i) for b in _take(single) for i in b["indices"]]
    assert sorted(heads[0] + heads[1] + rest) == list(range(48))


def test_sampler_pads_ranks_to_equal_length_for_training_and_not_for_eval():
    train = [list(ResumableDistributedSampler(10, rank=r, world_size=3, seed=1)) for r in range(3)]
    assert [len(s) for s in train] == [4, 4, 4]
    indices = [index for share in train for _, index in share]
    assert set(indices) == set(range(10)) and len(indices) == 12  # two wrapped-around repeats
    evaluation = [list(ResumableDistributedSampler(10, rank=r, world_size=3, shuffle=False, pad=False)) for r in range(3)]
    assert sorted(index for share in evaluation for _, index in share) == list(range(10))
    sampler = ResumableDistributedSampler(10, rank=0, world_size=1)
    sampler.set_epoch(5, position=4)
    assert all(epoch == 5 for epoch, _ in sampler) and len(sampler) == 6


def test_resume_state_from_other_data_is_refused_with_a_hint():
    loader = _loader(_cfg())
    _take(loader, batches=2)
    state = loader.state_dict()
    other = _loader(_cfg(synthetic_size=40))
    with pytest.raises(ValueError, match=r"dataset_size 48 -> 40.*set_epoch"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a map loader state"):
        other.load_state_dict({"format": 1, "kind": "shards", "epoch": 0})


def test_mask_generator_must_return_bool_masks():
    collator = Collator(lambda batch_size, rng: torch.zeros(batch_size, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="bool tensor"):
        collator([{"image": torch.zeros(3, 4, 4), "seed_key": (0, 0, 1), "bad": []}])


def test_eval_loader_keeps_order_and_every_sample_once():
    cfg = _cfg(synthetic_size=10)
    loader = build_loader(cfg, batch_size=4, purpose="eval", rank=0, world_size=1)
    assert [int(i) for b in _take(loader) for i in b["indices"]] == list(range(10))
    assert len(loader) == 3


def test_rank_and_world_size_come_together():
    with pytest.raises(ValueError, match="together"):
        build_loader(_cfg(), batch_size=2, rank=1)


def test_per_sample_generator_is_the_documented_seed_stream():
    from evamim.data.samples import MASK_STREAM, sample_rng

    cfg = _cfg()
    batch = next(iter(_loader(cfg)))
    index = int(batch["indices"][0])
    expected = RandomPatchMask(16, 6)(1, sample_rng((cfg.seed, 0, index), MASK_STREAM))[0]
    assert torch.equal(batch["masks"][0], expected)
    assert np.random.default_rng([cfg.seed, 0, index, MASK_STREAM]).random() == sample_rng((cfg.seed, 0, index), MASK_STREAM).random()
