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
before the damage are kept.

With ``shard_sampling="resample"`` each worker draws shards at random with replacement, forever,
and an epoch is ``samples_per_epoch`` samples per rank (webdataset's recipe for multi-node
training: every rank sees the same number of samples, whatever the shard sizes).
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from evamim.data.config import SHARD_SUFFIXES
from evamim.data.decode import BadSample, decode_image
from evamim.data.samples import AUGMENT_STREAM, RawSample, make_sample, sample_rng
from evamim.data.transforms import ImageTransform

logger = logging.getLogger("evamim.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# In resample mode a run of shards without one usable sample means the shards are broken.
MAX_EMPTY_SHARDS_IN_A_ROW = 100


def require_webdataset():
    """The ``webdataset`` module, or an error saying how to install it."""
    try:
        import webdataset
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "reading or writing WebDataset shards needs the webdataset package: pip install 'evamim[data]'"
        ) from error
    return webdataset


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


def _error_text(error: BaseException) -> str:
    # Only the first argument: webdataset appends the stream and URL to the others.
    first = error.args[0] if error.args else ""
    if isinstance(error, OSError) and error.strerror:  # args[0] of an OSError is its errno
        first = error.strerror
    return f"{type(error).__name__}: {first}"


def shard_events(urls: Iterable[str], *, give_up_after_empty: int | None = None) -> Iterator[tuple[str, Any]]:
    """``("sample", raw dict)``, ``("end", url)`` after each shard, ``("error", "url: reason")``.

    Every way a shard can be damaged (unopenable, not a tar, a corrupt header or truncated data in
    the middle, duplicate members) becomes one ``error`` event naming the shard and, when the tar
    data could be partly read, the byte offset and the last member read.
    """
    require_webdataset()
    from webdataset.tariterators import group_by_keys

    empty_in_a_row = 0
    for url in urls:
        errors: list[str] = []

        def handler(error: BaseException, url: str = url, errors: list[str] = errors) -> bool:
            errors.append(f"{url}: {_error_text(error)}")
            return True  # skip what is broken, keep reading

        count = 0
        for raw in group_by_keys(tar_members(url, errors), handler=handler):
            count += 1
            yield "sample", raw
        for error in errors:
            yield "error", error
        yield "end", url
        empty_in_a_row = 0 if count else empty_in_a_row + 1
        if give_up_after_empty is not None and empty_in_a_row >= give_up_after_empty:
            raise RuntimeError(f"the last {empty_in_a_row} shards read held no samples (last: {url}); check data.path")


class _WatchedHeader(tarfile.TarInfo):
    """Records on the archive why reading headers stopped: tarfile keeps it to itself, and treats a
    corrupt header after the first member exactly like the end of the archive."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as error:
            tarfile_.stopped_at = (error, tarfile_.offset)  # type: ignore[attr-defined]
            raise


# Members webdataset skips too: its metadata, named like ``__name__``.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def tar_members(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The regular members of shard ``url`` as ``{"fname", "data", "__url__"}`` (webdataset's format).

    The shard is read as a stream (so URLs and ``pipe:`` commands work). Damage is appended to
    ``errors`` as ``url: what, at byte N, after member M; the rest of the shard was not read``: a
    corrupt header in the middle used to end the shard silently, losing every sample after it.
    """
    from webdataset.gopen import gopen

    try:
        stream = gopen(url)
    except Exception as error:  # noqa: BLE001 - any failure to open is this shard's, reported with its URL
        errors.append(f"{url}: cannot open: {_error_text(error)}")
        return
    first_error, archive, member, last_read, finished = len(errors), None, None, None, False
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedHeader)
        for member in archive:
            if not member.isreg() or _META_MEMBER.match(member.name):
                continue
            data = archive.extractfile(member).read()
            last_read = member.name
            yield {"fname": member.name, "data": data, "__url__": url}
            archive.members = []  # a streamed archive would otherwise keep every header in memory
        damage = _stop_reason(archive)
        if damage:
            errors.append(f"{url}: {damage}{_after(last_read)}; the rest of the shard was not read")
        finished = True
    # Corrupt bytes make tarfile and the decompressors raise many types (ReadError, EOFError,
    # zlib.error, OSError from a failing pipe ...): all of them are this shard's damage.
    except Exception as error:  # noqa: BLE001
        errors.append(f"{url}: {_read_failure(error, archive, member, last_read)}")
        finished = True
    finally:
        _close(stream, url, errors if finished else None, first_error)


def _read_failure(error: Exception, archive: tarfile.TarFile | None, member: Any, last_read: str | None) -> str:
    if archive is None:  # the first header already failed
        return f"not a readable tar archive ({_error_text(error)})"
    if member is not None and member.name != last_read:  # failed inside this member's data
        where = f" in member {member.name} (header at byte {member.offset})"
    else:
        where = f" at byte {archive.offset}"
    return f"{_error_text(error)}{where}{_after(last_read)}; the rest of the shard was not read"


def _stop_reason(archive: tarfile.TarFile) -> str | None:
    """What ended a streamed archive early, or None when it ended at its end."""
    stopped = getattr(archive, "stopped_at", None)
    if stopped is None:
        return None
    error, offset = stopped
    if isinstance(error, (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)):
        return f"corrupt tar header at byte {offset} ({error})"
    if isinstance(error, tarfile.EOFHeaderError) and _data_after_end(archive):
        return f"an end-of-archive block at byte {offset} is followed by more data"
    return None  # EOFHeaderError or EmptyHeaderError: the archive's regular end


def _data_after_end(archive: tarfile.TarFile) -> bool:
    """Whether anything but zero padding follows the end-of-archive block (normally < 10 KiB)."""
    while chunk := archive.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            return True
    return False


def _after(member: str | None) -> str:
    return f", after member {member}" if member else ", before its first member"


def _close(stream: Any, url: str, errors: list[str] | None, first_error: int) -> None:
    """Close a shard stream; a ``pipe:`` command's failing exit status is reported when the shard was
    read to its end (``errors`` given): added to this shard's damage line, whose likely cause it
    is, else on a line of its own. After stopping early (a quota reached) the command was cut off on
    purpose, and its status means nothing."""
    try:
        stream.close()
    except Exception as error:  # noqa: BLE001 - webdataset's Pipe raises OSError for a bad exit status
        if errors is None:
            return
        if len(errors) > first_error:
            errors[-1] += f" (closing it: {_error_text(error)})"
        else:
            errors.append(f"{url}: {_error_text(error)}")


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

    def worker_quota(self, worker: int, num_workers: int) -> int | None:
        """Samples worker ``worker`` delivers this epoch, or None for "all of its shards"."""
        if not self.samples_per_epoch:
            return None
        remaining = max(0, self.samples_per_epoch - self.consumed)
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
