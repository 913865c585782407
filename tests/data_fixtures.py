"""Helpers for the data tests: real photos from scikit-image / scikit-learn, bad files, a mask stand-in."""

from __future__ import annotations

import contextlib
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import evamim  # noqa: F401  (makes torchvision importable before skimage/timm pull it in)
from evamim.engine.batching import infer_batch_size


def real_photos(max_side: int = 96) -> dict[str, np.ndarray]:
    """Five real photos shipped inside scikit-image and scikit-learn, downscaled to ``max_side``."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    photos = {"chelsea": data.chelsea(), "astronaut": data.astronaut(), "coffee": data.coffee(), "china": china, "flower": flower}
    small = {}
    for name, array in photos.items():
        image = Image.fromarray(array)
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        small[name] = np.asarray(image)
    return small


def write_photo_folder(root: Path, *, classes: bool = False, max_side: int = 96) -> dict[str, list[Path]]:
    """Real photos as JPEG and PNG, plus three bad files: a truncated JPEG, text named .jpg, an empty .png.

    With ``classes`` the files go into ``root/animal`` and ``root/thing``. Returns {"good": [...], "bad": [...]}.
    """
    photos = real_photos(max_side)
    good, bad = [], []
    for number, (name, array) in enumerate(sorted(photos.items())):
        folder = root / (("animal" if name in ("chelsea", "flower") else "thing") if classes else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.{'png' if number % 2 else 'jpg'}"
        Image.fromarray(array).save(path)
        good.append(path)
    folder = root / ("animal" if classes else "")
    full = good[0].read_bytes() if good[0].suffix == ".jpg" else None
    assert full is not None, "the first photo must be a JPEG to truncate"
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    text = root / ("thing" if classes else "") / "notes.jpg"
    text.write_text("this is not an image\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    bad = [truncated, text, empty]
    return {"good": good, "bad": bad}


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


class RandomPatchMask:
    """Stand-in for BlockMasking: ``(batch_size, rng) -> (batch_size, num_patches)`` bool, True = masked."""

    def __init__(self, num_patches: int = 16, num_masked: int = 6):
        self.num_patches = num_patches
        self.num_masked = num_masked

    def __call__(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        masks = np.zeros((batch_size, self.num_patches), dtype=bool)
        for row in masks:
            row[rng.choice(self.num_patches, self.num_masked, replace=False)] = True
        return torch.from_numpy(masks)


class FailureLines(logging.Handler):
    """Collects the ``path: reason`` lines the loader logs for the samples it skipped (first time and again)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("skipped bad sample") and record.args:
            self.lines.append(str(record.args[0]))


@contextlib.contextmanager
def failure_lines():
    """``with failure_lines() as lines:`` -- the loader's failure lines logged inside the block."""
    logger = logging.getLogger("evamim.data")
    handler, level = FailureLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def collect(loader) -> dict[str, list]:
    """Iterate one epoch of ``loader``; concatenate every batch key over batches.

    Every entry of every batch must be per-sample (the loader keeps its bookkeeping to itself); the
    failures the loader logged meanwhile are under ``"failures"`` (one ``path: reason`` line each).
    """
    out: dict[str, list] = {"failures": []}
    with failure_lines() as failures:
        for batch in loader:
            assert "failures" not in batch
            size = infer_batch_size(batch)  # refuses an entry whose length is not the batch size
            for key, value in batch.items():
                assert isinstance(value, (torch.Tensor, list)) and len(value) == size, key
                out.setdefault(key, []).extend(list(value))
    out["failures"] = list(failures)
    return out


def write_seg_folder(root: Path, train: int = 8, val: int = 3, size: int = 24, seed: int = 0) -> Path:
    """A tiny ADE20K-layout dataset (images/<split>/*.jpg, annotations/<split>/*.png): a bright square (class 1)
    on a dark background (class 0), stored as-is (no reduce_zero_label). Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", train), ("validation", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros((size, size), np.uint8)
            y, x = rng.integers(0, size // 2, 2).tolist()
            label[y : y + size // 3, x : x + size // 3] = 1
            pixels = np.where(label[..., None] == 1, 220, 30).astype(np.uint8).repeat(3, axis=2)
            Image.fromarray(pixels).save(root / "images" / split / f"{split}_{i:03d}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"{split}_{i:03d}.png")
    return root
