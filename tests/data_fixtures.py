"""Helpers for the data tests: real photos from scikit-image / scikit-learn, bad files, a mask stand-in."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import evamim  # noqa: F401  (makes torchvision importable before skimage/timm pull it in)


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


def collect(loader) -> dict[str, list]:
    """Iterate one epoch of ``loader``; concatenate every batch key over batches."""
    out: dict[str, list] = {}
    for batch in loader:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                out.setdefault(key, []).extend(list(value))
            elif isinstance(value, list):
                out.setdefault(key, []).extend(value)
            else:
                out.setdefault(key, []).append(value)
    return out
