"""Collate sample dicts into a batch dict, drawing the masks (in the workers, off the GPU's path).

Batch keys of ``Collator`` (present when the samples have them); every entry holds one row per sample:
- ``images``: ``(B, 3, H, W)`` float32, normalised with the student's mean/std; or uint8 pixels when the
  transform gives uint8 (``build_loader(..., output="uint8")``: normalised on the device).
- ``masks``: ``(B, N)`` bool, True = masked patch (only with a mask generator).
- ``labels``: ``(B,)`` long.  ``captions``: list of B str.
- ``indices``: ``(B,)`` long dataset indices (map-style).  ``keys``: list of B shard keys (shards).

What a dataset reports besides its samples (failures, finished shards) never reaches a batch:
``LoaderCollate`` takes it out in the worker and hands it to the loader next to the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from evamim.data.samples import MASK_STREAM, sample_rng

MaskGenerator = Callable[[int, np.random.Generator], torch.Tensor]
"""``mask_generator(batch_size, rng) -> (batch_size, N) bool tensor``, True = masked."""

BOOKKEEPING = ("bad", "shards_done")
"""Keys a dataset item may carry for the loader, not for the batch: ``bad`` (``path: reason`` lines of
failures met while making the item) and ``shards_done`` (shards finished once the item is consumed).
An item holding nothing else is a marker: it carries bookkeeping only and is no sample."""


class Collator:
    """Stacks samples and, given a mask generator, draws each sample's mask from its own stream.

    The generator is called once per sample with ``batch_size=1`` and a generator seeded by that
    sample's ``(seed, epoch, sample id)``: a sample's mask depends on nothing else (not the batch it
    landed in, the number of workers or ranks), so a resumed run reproduces it exactly.
    """

    def __init__(self, mask_generator: MaskGenerator | None = None):
        self.mask_generator = mask_generator

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("Collator got no samples: the loader only collates batches that hold some")
        first = samples[0]
        # default_collate stacks into shared memory when run in a worker: one copy fewer.
        batch: dict[str, Any] = {"images": default_collate([sample["image"] for sample in samples])}
        if self.mask_generator is not None:
            batch["masks"] = torch.cat([self._mask(sample["seed_key"]) for sample in samples])
        if "label" in first:
            batch["labels"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.long)
        if "caption" in first:
            batch["captions"] = [sample["caption"] for sample in samples]
        if "index" in first:
            batch["indices"] = torch.tensor([sample["index"] for sample in samples], dtype=torch.long)
        if "key" in first:
            batch["keys"] = [sample["key"] for sample in samples]
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


@dataclass
class BatchInfo:
    """What the loader learns from one batch of dataset items besides the batch itself."""

    items: int
    """Dataset items the batch was made of, markers included (map-style: sampler positions consumed)."""
    samples: int
    """Samples in the batch (items minus markers)."""
    failures: list[str] = field(default_factory=list)
    """``path: reason`` lines of the failures met while these items were made."""
    shards_done: list[str] = field(default_factory=list)


class LoaderCollate:
    """The loader's collate step: ``items -> (batch or None, BatchInfo)``.

    Runs in the workers. Markers are dropped and the bookkeeping keys removed from the samples before
    ``collate_fn`` sees them, so ``collate_fn`` only stacks samples and every entry of a batch is
    per-sample. A batch of markers only is ``None`` (the loader counts its failures and skips it).
    """

    def __init__(self, collate_fn: Callable[[list[dict[str, Any]]], Any]):
        self.collate_fn = collate_fn

    def __call__(self, items: list[dict[str, Any]]) -> tuple[Any, BatchInfo]:
        samples = [
            {key: value for key, value in item.items() if key not in BOOKKEEPING}
            for item in items
            if any(key not in BOOKKEEPING for key in item)
        ]
        info = BatchInfo(
            items=len(items),
            samples=len(samples),
            failures=[line for item in items for line in item.get("bad", ())],
            shards_done=[url for item in items for url in item.get("shards_done", ())],
        )
        return (self.collate_fn(samples) if samples else None), info
