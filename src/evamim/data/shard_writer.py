"""``make_shards``: write WebDataset tar shards from an image folder or a list file.

Each sample becomes ``<key>.jpg|png|webp`` (the image), ``<key>.cls`` (with labels), ``<key>.txt``
(when a caption file ``<image stem>.txt`` lies next to the image) and ``<key>.json`` (the source
path, size and class name). Keys are ``<8-digit sequence number>_<sanitised file stem>``: only
letters, digits, ``_`` and ``-``, so no member name can climb out of a folder when extracted.

Images are validated by decoding them completely; bad ones are skipped and reported. An image
is copied byte for byte when it is a JPEG, PNG or WebP within ``max_side``; otherwise it is
re-encoded as JPEG (``quality``), resized so its longer side is ``max_side``. Pixel data is kept as
stored: EXIF orientation is not applied, just as the loader does not apply it.

Shards are written as ``<prefix>-<6 digits>.tar.partial`` and renamed when complete, so a stopped
run never leaves a truncated shard that looks finished. Nothing is written outside ``out``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from evamim import atomic
from evamim.data.config import TABLE_SUFFIXES
from evamim.data.decode import BadSample, decode_image_and_format
from evamim.data.files import FileEntry, read_list, scan_folder
from evamim.data.shards import require_webdataset

COPYABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9_-]+")


@dataclasses.dataclass
class ShardReport:
    """What ``make_shards`` wrote: shard paths with their sample counts, and the skipped files."""

    shards: list[tuple[str, int]]
    bad: list[str]
    classes: list[str]

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.shards)


@dataclasses.dataclass
class _Encoded:
    ext: str
    data: bytes
    width: int
    height: int
    source_size: tuple[int, int]


def sanitize_key(index: int, path: str) -> str:
    """``<index:08d>_<stem>`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``."""
    stem = _UNSAFE_IN_KEY.sub("_", Path(path).stem).strip("_")[:48]
    return f"{index:08d}_{stem}" if stem else f"{index:08d}"


def _check_prefix(prefix: str) -> None:
    if not _PREFIX.fullmatch(prefix) or ".." in prefix:
        raise ValueError(
            f"shard prefix {prefix!r} is not a plain file name (letters, digits, '_', '-', '.'; no '..' or '/'): "
            "refusing, since it could write outside the output folder"
        )


def _list_source(src: Path, labels: bool) -> tuple[list[FileEntry], list[str]]:
    if src.is_dir():
        return scan_folder(src, labels=labels)
    if src.is_file() and src.suffix.lower() in TABLE_SUFFIXES:
        # Read as a list, each row would be taken for a path and every sample would fail.
        raise ValueError(f"source {src} is a caption table: make-shards writes images (and labels) from an image "
                         f"folder or a list file, not captions; train on the table itself (data.path={src})")
    if src.is_file():
        return read_list(src, labels=labels), []
    raise FileNotFoundError(f"source {src} does not exist: pass an image folder or a list file")


def encode_for_shard(path: str, *, max_side: int | None, quality: int, max_pixels: int) -> _Encoded:
    """Validate one image by decoding it; keep its bytes or re-encode it (see the module docstring).

    Raises:
        BadSample: the file is not a usable image.
    """
    with open(path, "rb") as file:
        raw = file.read()

    def draft(width: int, height: int) -> tuple[int, int] | None:
        # Only when resizing anyway: decode big JPEGs at a reduced scale still >= the target size.
        if max_side is None or max(width, height) <= max_side:
            return None
        scale = max_side / max(width, height)
        return math.ceil(width * scale), math.ceil(height * scale)

    image, file_format, source_size = decode_image_and_format(raw, max_pixels=max_pixels, draft_size=draft)
    too_big = max_side is not None and max(source_size) > max_side
    if file_format in COPYABLE and not too_big:
        return _Encoded(COPYABLE[file_format], raw, image.width, image.height, source_size)
    if too_big:
        scale = max_side / max(image.size)
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return _Encoded("jpg", buffer.getvalue(), image.width, image.height, source_size)


def _encode_job(args: tuple[str, int | None, int, int]) -> _Encoded | str:
    path, max_side, quality, max_pixels = args
    try:
        return encode_for_shard(path, max_side=max_side, quality=quality, max_pixels=max_pixels)
    except BadSample as error:
        return error.reason
    except OSError as error:  # unreadable file (permissions, vanished): bad data, not a bug
        return f"{type(error).__name__}: {error}"


def _encoded_stream(
    entries: list[FileEntry], *, max_side: int | None, quality: int, max_pixels: int, workers: int
) -> Iterator[_Encoded | str]:
    jobs = ((entry.path, max_side, quality, max_pixels) for entry in entries)
    if workers <= 1:
        yield from map(_encode_job, jobs)
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_encode_job, jobs, chunksize=16)


class _ShardSink:
    """Rotates TarWriters over ``<prefix>-NNNNNN.tar`` files inside ``out``, shard_size samples each."""

    def __init__(self, out: Path, prefix: str, shard_size: int):
        self.out = out.resolve()
        self.prefix = prefix
        self.shard_size = shard_size
        self.shards: list[tuple[str, int]] = []
        self._writer = None
        self._file = None
        self._count = 0

    def _path(self, number: int) -> Path:
        path = (self.out / f"{self.prefix}-{number:06d}.tar").resolve()
        if path.parent != self.out:
            raise ValueError(f"refusing to write {path}: outside the output folder {self.out}")
        return path

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._count += 1
        if self._count >= self.shard_size:
            self.close()

    def _open(self) -> None:
        final = self._path(len(self.shards))
        partial = final.with_name(final.name + ".partial")
        if partial.is_symlink() or partial.exists():
            partial.unlink()
        # "x": exclusive create, which also refuses to follow a symlink planted at this name.
        self._file = open(partial, "xb")
        # A fixed mtime makes the shards of the same input byte-identical, run after run.
        self._writer = require_webdataset().TarWriter(self._file, encoder=False, mtime=0.0)
        self._count = 0

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        final = self._path(len(self.shards))
        atomic.replace_file(final.with_name(final.name + ".partial"), final)
        self.shards.append((str(final), self._count))
        self._writer = self._file = None


def make_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    max_side: int | None = None,
    quality: int = 95,
    labels: bool = False,
    prefix: str = "shard",
    shuffle: bool = True,
    seed: int = 0,
    workers: int = 1,
    max_image_pixels: int = 89_478_485,
    overwrite: bool = False,
) -> ShardReport:
    """Write the images of ``src`` (folder or list file) into shards in the folder ``out``.

    ``shuffle`` (default on) writes the images in a seeded random order, so that a shard mixes
    classes and folders; sorted order would put one class per shard and defeat buffer shuffling.

    Raises:
        FileNotFoundError: ``src`` is missing or holds no images.
        FileExistsError: ``out`` already holds ``<prefix>-*.tar`` and ``overwrite`` is off.
        ValueError: bad arguments (an unsafe prefix, shard_size < 1, ...).
    """
    _check_prefix(prefix)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"--max-side must be >= 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in [1, 100], got {quality}")
    src, out = Path(src), Path(out)
    entries, classes = _list_source(src, labels)
    if shuffle:
        entries = [entries[i] for i in np.random.default_rng(seed).permutation(len(entries))]
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} shards named {prefix}-*.tar; pass --overwrite or another --prefix"
        )
    for stale in existing:
        stale.unlink()

    sink = _ShardSink(out, prefix, shard_size)
    bad: list[str] = []
    written = 0
    stream = _encoded_stream(entries, max_side=max_side, quality=quality, max_pixels=max_image_pixels, workers=workers)
    try:
        for entry, result in zip(entries, stream):
            if isinstance(result, str):
                bad.append(f"{entry.path}: {result}")
                continue
            sink.write(_sample(entry, result, written, classes, src))
            written += 1
    finally:
        sink.close()
    report = ShardReport(sink.shards, bad, classes)
    _write_info(out / f"{prefix}-info.json", report, src)
    return report


def _sample(entry: FileEntry, encoded: _Encoded, number: int, classes: list[str], src: Path) -> dict:
    key = sanitize_key(number, entry.path)
    source = os.path.relpath(entry.path, src if src.is_dir() else src.parent)
    meta = {"source": source, "width": encoded.width, "height": encoded.height}
    if encoded.source_size != (encoded.width, encoded.height):
        meta["source_width"], meta["source_height"] = encoded.source_size
    sample = {"__key__": key, encoded.ext: encoded.data}
    if entry.label is not None:
        sample["cls"] = str(entry.label).encode()
        if classes:
            meta["class"] = classes[entry.label]
    caption = Path(entry.path).with_suffix(".txt")
    if caption.is_file():
        sample["txt"] = caption.read_bytes()
    sample["json"] = json.dumps(meta).encode()
    return sample


def _write_info(path: Path, report: ShardReport, src: Path) -> None:
    info = {
        "source": str(src),
        "num_samples": report.num_samples,
        "shards": [{"name": os.path.basename(name), "samples": count} for name, count in report.shards],
        "classes": report.classes,
        "skipped": report.bad,
    }
    atomic.write_json(path, info, indent=1)
