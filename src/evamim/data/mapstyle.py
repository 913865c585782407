"""``MapDataset``: indexable dataset over a map-style source (files or synthetic), bad samples replaced.

A bad sample (unreadable, truncated, not an image, too large, a symlink loop, or an image its
transform raises on) is replaced by the next index that loads, so batches always stay full; the
failure travels inside the returned sample (``"bad"``: ``path: reason`` lines) to be counted and
logged in the main process. Each bad file is reported once per epoch (when its own index is
requested), even if it is also met as a replacement. The replacement keeps the *requested* sample's
random stream (its crop and mask), so the run stays deterministic.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Protocol

from torch.utils.data import Dataset

from evamim.data.decode import BadSample, decode_image
from evamim.data.samples import AUGMENT_STREAM, RawSample, make_sample, sample_rng
from evamim.data.transforms import ImageTransform

logger = logging.getLogger("evamim.data")


class MapSource(Protocol):
    """What ``MapDataset`` needs from a source (``FileSource``, ``SyntheticShapes``)."""

    has_labels: bool
    has_captions: bool

    def __len__(self) -> int: ...

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from (a path), for error messages."""
        ...

    def load(self, index: int, decode: Any) -> RawSample:
        """Load sample ``index`` with ``decode(path) -> RGB image``; raises ``BadSample``."""
        ...


class MapDataset(Dataset):
    """``dataset[(epoch, index)]`` -> sample dict (see ``evamim.data.samples.make_sample``).

    The sample dict also holds ``"index"`` (the dataset index actually delivered, which differs
    from the requested one when a bad sample was replaced) and ``"bad"`` (the requested sample's
    failure, when it was replaced).
    A plain integer index means epoch 0.
    """

    def __init__(
        self,
        source: MapSource,
        transform: ImageTransform,
        *,
        seed: int = 0,
        labels: bool = False,
        captions: bool = False,
        max_image_pixels: int = 89_478_485,
        max_consecutive_bad: int = 64,
    ):
        if labels and not source.has_labels:
            raise ValueError(
                f"data.labels is on but {source.origin} has no labels (use class sub-folders or `path label` lines)"
            )
        if captions and not source.has_captions:
            raise ValueError(f"data.captions is on but {source.origin} has no captions: give image-caption pairs (a "
                             ".csv / .tsv table with a caption column, or shards with txt / json entries)")
        self.source = source
        self.transform = transform
        self.seed = seed
        self.labels = labels
        self.captions = captions
        self.max_consecutive_bad = max(1, max_consecutive_bad)
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        failures: list[str] = []
        size = len(self.source)
        seed_key = (self.seed, epoch, index)
        # Only the requested index's own failure is reported: a bad file met while looking for a
        # replacement is reported when its own index comes up, so each epoch counts it once.
        for step in range(min(self.max_consecutive_bad, size)):
            current = (index + step) % size
            where = self.source.describe(current)
            # A fresh plan per attempt from the requested sample's stream: a replacement gets the
            # crop and mask the requested sample would have had.
            plan = self.transform.prepare(sample_rng(seed_key, AUGMENT_STREAM))
            decode = functools.partial(decode_image, max_pixels=self.max_image_pixels, draft_size=plan.draft_size)
            try:
                raw = self.source.load(current, decode)
                sample = make_sample(
                    raw,
                    plan,
                    seed_key,
                    labels=self.labels,
                    captions=self.captions,
                    where=where,
                )
            except BadSample as error:
                logger.debug("bad sample %s: %s", where, error.reason)
                failures.append(f"{where}: {error.reason}")
                continue
            sample["index"] = current
            sample["bad"] = failures[:1] if current != index else []
            return sample
        raise RuntimeError(
            f"{len(failures)} consecutive samples failed to load, starting at index {index}:\n  "
            + "\n  ".join(failures[:10])
            + "\nThe dataset looks broken here; run `evamim data inspect` on it, or raise data.max_consecutive_bad."
        )

