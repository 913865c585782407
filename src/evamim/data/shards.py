"""``ShardDataset``: WebDataset tar shards, split across ranks and workers, shuffled, resumable per shard.

Shards are read with the ``webdataset`` library (local paths, brace patterns, ``http(s)://`` URLs,
``pipe:`` commands). A sample is the group of tar members sharing a key: the image under ``jpg``,
``jpeg``, ``png`` or ``webp``; the label under ``cls`` (an integer); the caption under ``txt`` or
in ``json`` (field ``caption`` or ``text``).

Epoch ``e`` with ``shard_sampling="split"``: the shard list is permuted by ``(seed, e)`` (the same
on every rank), rank ``r`` takes every ``world_size``-th shard from ``r``, and each DataLoader
worker every ``num_workers``-th of those. Every sample is then read once per epoch. Each worker
shuffles its samples through a buffer seeded by ``(seed, e, rank, worker)``.

Resuming is at shard granularity: every sample carries the shards whose last buffered sample it
follows (``"shards_done"``); the loader records those of the batches it handed out, and a resumed
epoch skips them. Shards that were only partly consumed when the run stopped are read again from
their start (so up to about ``num_workers`` shards' worth of samples repeat, never skipped).

Damaged shards never end silently: a shard that cannot be opened or is not a tar, a corrupt header
or truncated data in the middle (which Python's tarfile takes for the end of the archive), is one
bad sample ``url: what, at byte N, after member M``, counted like a bad image; the samples read
before the damage are kept (see ``evamim.data.tar_reader``).

With ``shard_sampling="resample"`` each worker draws shards at random with replacement, forever,
and an epoch is ``samples_per_epoch // world_size`` samples per rank (webdataset's recipe for
multi-node training: every rank sees the same number of samples, whatever the shard sizes).

``samples_per_epoch`` counts the samples of one epoch over all ranks, so one recipe means the same
amount of data on any number of GPUs. Each rank's share is ``samples_per_epoch // world_size``:
rounded down, the same on every rank, so that all ranks take the same number of steps (the
remainder, fewer than ``world_size`` samples, is left out of the epoch).
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from evamim.data.config import SHARD_SUFFIXES
from evamim.data.decode import BadSample, decode_image
from evamim.data.samples import AUGMENT_STREAM, RawSample, make_sample, sample_rng
from evamim.data.tar_reader import require_webdataset, shard_events  # noqa: F401  (re-exported)
from evamim.data.transforms import ImageTransform

logger = logging.getLogger("evamim.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# In resample mode a run of shards without one usable sample means the shards are broken.
MAX_EMPTY_SHARDS_IN_A_ROW = 100


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_shards(spec: str) -> list[str]:
    """The shard URLs ``spec`` names: a folder (its ``*.tar``, ``*.tar.gz``, ``*.tgz``), brace patterns
    joined by ``::``, URLs.

    Raises:
        FileNotFoundError: nothing matches, or local shards are missing (the first few are named).
    """
    spec = str(spec)
    if os.path.isdir(spec):
        urls = sorted(url for suffix in SHARD_SUFFIXES for url in glob.glob(os.path.join(spec, "*" + suffix)))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in folder {spec} (data.path)")
        return urls
    require_webdataset()  # a clear message when webdataset is missing
    from webdataset.shardlists import expand_urls

    urls = [url for url in expand_urls(spec) if url]
    if not urls:
        raise FileNotFoundError(f"shard pattern {spec!r} names no shards (data.path)")
    missing = [url for url in urls if not is_remote(url) and not os.path.isfile(url.removeprefix("file:"))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards named by {spec!r} do not exist, e.g. {', '.join(missing[:3])} (data.path)"
        )
    return urls


def _shuffle(events: Iterator[tuple[str, Any]], buffer_size: int, rng: np.random.Generator):
    """Shuffle samples through a buffer, tracking when each shard's samples have all left it.

    Yields ``(raw sample or None, shards finished, errors)``; a shard is finished once it was read
    to its end and its last sample left the buffer.
    """
    buffer: list[dict] = []
    in_buffer: Counter[str] = Counter()
    read_to_end: set[str] = set()

    def release(index: int) -> tuple[dict, list[str]]:
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        raw = buffer.pop()
        url = raw["__url__"]
        in_buffer[url] -= 1
        return raw, [url] if in_buffer[url] == 0 and url in read_to_end else []

    for kind, value in events:
        if kind == "sample":
            buffer.append(value)
            in_buffer[value["__url__"]] += 1
            if len(buffer) > buffer_size:
                yield (*release(int(rng.integers(len(buffer)))), [])
        elif kind == "end":
            read_to_end.add(value)
            if in_buffer[value] == 0:
                yield None, [value], []
        else:
            yield None, [], [value]
    while buffer:
        yield (*release(int(rng.integers(len(buffer)))), [])


def sample_id(url: str, key: str) -> int:
    """A stable 32-bit id of a shard sample (shard file name + key) that seeds its randomness."""
    return zlib.crc32(f"{os.path.basename(url)}/{key}".encode())


class ShardDataset(IterableDataset):
    """Iterable over the sample dicts of this rank's shards for ``self.epoch``.

    ``samples_per_epoch`` (all ranks together) caps each rank's epoch at its share (split) or sets the
    epoch's length (resample); ``listed_samples`` (all ranks, e.g. from ``shard-info.json``) only tells
    the length of an epoch when ``samples_per_epoch`` is not set: every shard is still read in full.

    Attributes the loader sets before each epoch (workers are restarted per epoch, so they see them):
    ``epoch``; ``skip_shards`` (shards already consumed by this rank in this epoch, split mode);
    ``consumed`` (samples this rank already consumed in this epoch; caps and reseeds the rest).

    Each sample dict holds ``"image"``, ``"key"``, ``"seed_key"``, ``"label"``/``"caption"`` when
    asked for, ``"bad"`` (failures met since the previous sample) and ``"shards_done"``. A worker's
    last item may be a marker without ``"image"`` that only carries those two lists.
    """

    def __init__(
        self,
        urls: list[str],
        transform: ImageTransform,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        labels: bool = False,
        captions: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        sampling: str = "split",
        samples_per_epoch: int | None = None,
        listed_samples: int | None = None,
        max_image_pixels: int = 89_478_485,
    ):
        if not urls:
            raise ValueError("ShardDataset needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if sampling == "split" and len(urls) < world_size:
            raise ValueError(
                f"only {len(urls)} shards for {world_size} ranks: some ranks would get no data. "
                "Write smaller shards (evamim data make-shards --shard-size) or use data.shard_sampling=resample"
            )
        if sampling == "resample" and not samples_per_epoch:
            raise ValueError("shard_sampling=resample needs samples_per_epoch")
        for name, count in (("samples_per_epoch", samples_per_epoch), ("listed_samples", listed_samples)):
            if count is not None and count < world_size:
                raise ValueError(
                    f"{name}={count} counts all ranks together: it leaves no sample to each of {world_size} ranks. "
                    f"Set data.samples_per_epoch to the samples of one epoch over all ranks (>= {world_size})"
                )
        self.urls = list(urls)
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.labels = labels
        self.captions = captions
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.sampling = sampling
        self.samples_per_epoch = samples_per_epoch
        self.listed_samples = listed_samples
        self.max_image_pixels = max_image_pixels
        self.origin = f"{len(self.urls)} shards ({self.urls[0]} ...)"
        self.epoch = 0
        self.skip_shards: frozenset[str] = frozenset()
        self.consumed = 0

    def rank_shards(self, epoch: int) -> list[str]:
        """This rank's shards of ``epoch`` in reading order (split mode)."""
        order = np.arange(len(self.urls))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order[self.rank :: self.world_size]]

    def rank_quota(self) -> int | None:
        """This rank's samples per epoch, ``samples_per_epoch // world_size``, or None for "all of its shards"."""
        return self.samples_per_epoch // self.world_size if self.samples_per_epoch else None

    def rank_length(self) -> int | None:
        """This rank's nominal samples per epoch (for ``len(loader)``): its quota, else its share of
        ``listed_samples``; None when neither is known."""
        total = self.samples_per_epoch or self.listed_samples
        return total // self.world_size if total else None

    def worker_quota(self, worker: int, num_workers: int) -> int | None:
        """Samples worker ``worker`` delivers this epoch, or None for "all of its shards"."""
        quota = self.rank_quota()
        if quota is None:
            return None
        remaining = max(0, quota - self.consumed)
        return remaining // num_workers + (1 if worker < remaining % num_workers else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream_seed = [self.seed, self.epoch, self.rank, worker, self.consumed]
        if self.sampling == "split":
            shards = [url for url in self.rank_shards(self.epoch) if url not in self.skip_shards]
            events = shard_events(shards[worker::num_workers])
        else:
            pick = np.random.default_rng([*stream_seed, 1])
            forever = (self.urls[int(pick.integers(len(self.urls)))] for _ in itertools.count())
            events = shard_events(forever, give_up_after_empty=MAX_EMPTY_SHARDS_IN_A_ROW)
        stream = _shuffle(events, self.shuffle_buffer, np.random.default_rng(stream_seed))
        yield from self._samples(stream, self.worker_quota(worker, num_workers))

    def _samples(self, stream, quota: int | None) -> Iterator[dict[str, Any]]:
        pending_bad: list[str] = []
        pending_done: list[str] = []
        delivered = 0
        for raw, done, errors in stream:
            pending_done.extend(done)
            pending_bad.extend(errors)
            if raw is None:
                continue
            if quota is not None and delivered >= quota:
                break
            where = f"{raw.get('__url__')}:{raw.get('__key__')}"
            try:
                sample = self._make_sample(raw, where)
            except BadSample as error:
                logger.debug("bad sample %s: %s", where, error.reason)
                pending_bad.append(f"{where}: {error.reason}")
                continue
            sample["bad"], sample["shards_done"] = pending_bad, pending_done
            pending_bad, pending_done = [], []
            delivered += 1
            yield sample
        if pending_bad or pending_done:
            yield {"bad": pending_bad, "shards_done": pending_done}

    def _make_sample(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        image_key = next((key for key in IMAGE_KEYS if key in raw), None)
        if image_key is None:
            keys = ", ".join(sorted(key for key in raw if not key.startswith("__")))
            raise BadSample(f"no image entry ({'/'.join(IMAGE_KEYS)}) among: {keys or 'nothing'}")
        url, key = raw["__url__"], raw["__key__"]
        seed_key = (self.seed, self.epoch, sample_id(url, key))
        plan = self.transform.prepare(sample_rng(seed_key, AUGMENT_STREAM))
        image = decode_image(raw[image_key], max_pixels=self.max_image_pixels, draft_size=plan.draft_size)
        label = label_of(raw) if self.labels else None
        caption = caption_of(raw) if self.captions else None
        sample = make_sample(
            RawSample(image, label, caption),
            plan,
            seed_key,
            labels=self.labels,
            captions=self.captions,
            where=where,
        )
        sample["key"] = key
        return sample


def label_of(raw: dict[str, Any]) -> int | None:
    """The integer in a shard sample's ``cls`` entry, None without one; BadSample if not an integer."""
    if "cls" not in raw:
        return None
    text = raw["cls"].decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise BadSample(f"cls entry {text[:40]!r} is not an integer") from None


def caption_of(raw: dict[str, Any]) -> str | None:
    """A shard sample's ``txt`` entry, else the ``caption``/``text`` field of its ``json``; None without."""
    if "txt" in raw:
        return raw["txt"].decode("utf-8", "replace").strip()
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as error:
            raise BadSample(f"json entry is not valid JSON: {error}") from None
        for field in ("caption", "text"):
            if isinstance(meta, dict) and isinstance(meta.get(field), str):
                return meta[field].strip()
    return None
