"""Collate sample dicts into a batch dict, drawing the masks (in the workers, off the GPU's path).

Batch keys (present when the samples have them):
- ``images``: ``(B, 3, H, W)`` float32, normalised with the student's mean/std.
- ``masks``: ``(B, N)`` bool, True = masked patch (only with a mask generator).
- ``labels``: ``(B,)`` long.  ``captions``: list of B str.
- ``indices``: ``(B,)`` long dataset indices (map-style).  ``keys``: list of B shard keys (shards).
- ``num_bad``: int, samples that failed to load while this batch was made (already skipped).
- ``bad_samples``: list of ``path: reason`` lines for those failures.
- ``shards_done``: shards fully consumed once this batch is (shards; used by the loader to resume).
- ``num_items``: how many dataset items the batch was made of, markers included (the loader uses it
  to drop a worker's partial last batch after counting its failures, and removes it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from evamim.data.samples import MASK_STREAM, sample_rng

MaskGenerator = Callable[[int, np.random.Generator], torch.Tensor]
"""``mask_generator(batch_size, rng) -> (batch_size, N) bool tensor``, True = masked."""


class Collator:
    """Stacks samples and, given a mask generator, draws each sample's mask from its own stream.

    The generator is called once per sample with ``batch_size=1`` and a generator seeded by that
    sample's ``(seed, epoch, sample id)``: a sample's mask depends on nothing else (not the batch it
    landed in, the number of workers or ranks), so a resumed run reproduces it exactly.
    """

    def __init__(self, mask_generator: MaskGenerator | None = None):
        self.mask_generator = mask_generator

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [sample for sample in samples if "image" in sample]
        bad = [line for sample in samples for line in sample.get("bad", ())]
        batch: dict[str, Any] = {
            # default_collate stacks into shared memory when run in a worker: one copy fewer.
            "images": default_collate([sample["image"] for sample in good]) if good else torch.empty(0, 3, 0, 0),
            "num_bad": len(bad),
            "bad_samples": bad,
            "num_items": len(samples),
        }
        if good and self.mask_generator is not None:
            batch["masks"] = torch.cat([self._mask(sample["seed_key"]) for sample in good])
        if good and "label" in good[0]:
            batch["labels"] = torch.tensor([sample["label"] for sample in good], dtype=torch.long)
        if good and "caption" in good[0]:
            batch["captions"] = [sample["caption"] for sample in good]
        if good and "index" in good[0]:
            batch["indices"] = torch.tensor([sample["index"] for sample in good], dtype=torch.long)
        if good and "key" in good[0]:
            batch["keys"] = [sample["key"] for sample in good]
        if any("shards_done" in sample for sample in samples):
            batch["shards_done"] = [url for sample in samples for url in sample.get("shards_done", ())]
        return batch

    def _mask(self, seed_key: tuple[int, ...]) -> torch.Tensor:
        mask = self.mask_generator(1, sample_rng(seed_key, MASK_STREAM))
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[0] != 1:
            raise TypeError(
                f"mask_generator(1, rng) must return a (1, N) bool tensor (True = masked), "
                f"got dtype {mask.dtype} shape {tuple(mask.shape)}"
            )
        return mask
