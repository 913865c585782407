"""Semantic-segmentation data in the ADE20K folder layout: pairs, labels, and the resumable loader.

Layout (``SegDataConfig.root``)::

    images/<split>/<name>.jpg          RGB images (any format PIL reads)
    annotations/<split>/<name>.png     single-channel labels (PNG mode L or P), same file stem

Label convention once loaded: an (H, W) int64 map whose values 0..K-1 are classes and 255 is *ignore*
(``IGNORE_INDEX``: no loss, not scored). ADE20K stores 0 for "other" and 1..150 for its classes, so with
``reduce_zero_label`` (ADE20K's convention, on by default) a stored 0 becomes 255 and a stored v in 1..K
becomes v - 1; a stored 255 stays 255. Any other value >= K is an error naming the file.

Augmentation: ``evamim.data.seg_transforms``. Each sample's random draws come from a generator seeded
by ``(seed, epoch, index)``, so a resumed run repeats them.

Loading goes through the shared ``evamim.data.loader.Loader``: the same resume protocol (exact
mid-epoch resume) and the same bad-sample accounting as images. An unreadable image or label, or an
image whose size differs from its label's, is skipped (the batch is one smaller), logged, counted in
``bad_sample_totals()`` and judged by the ``max_bad_fraction`` limits. A label that is readable but
wrong for the config (colour-coded, or a value >= ``num_classes``) still stops the run: that is a
setting to fix, not one broken file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from evamim.data.config import CLIP_MEAN, CLIP_STD, DataConfig
from evamim.data.decode import BadSample, decode_image, load_untrusted
from evamim.data.failures import BadSampleMonitor
from evamim.data.files import is_image_name
from evamim.data.loader import Loader
from evamim.data.samples import AUGMENT_STREAM, sample_rng
from evamim.data.seg_transforms import (
    IGNORE_INDEX,
    SegEvalTransform,
    SegTrainTransform,
    photometric_distortion,
    random_crop_box,
    rescale_size,
)

LABEL_MODES = ("L", "P", "I", "I;16")
MAX_IMAGE_PIXELS = 89_478_485

SegLoader = Loader
"""The segmentation loader is the shared resumable ``Loader`` (kept under this name for callers)."""


@dataclass
class SegDataConfig:
    """Where the segmentation data is and how it is augmented and loaded."""

    root: str = ""
    """Dataset root holding ``images/<split>/`` and ``annotations/<split>/`` (ADE20K: ADEChallengeData2016)."""
    train_split: str = "training"
    """The training split; the validation split is the task's ``val_data.split``."""
    num_classes: int = 150
    """K: label values 0..K-1 after ``reduce_zero_label`` (ADE20K: 150)."""
    reduce_zero_label: bool = True
    """ADE20K convention: stored 0 ("other") -> 255 (ignored), stored v -> v - 1. Off: values are used as stored."""
    crop_size: int = 512
    """Side of the square training crop; also the backbone's input size and the sliding window."""
    train_scale: tuple[int, int] = (2048, 512)
    """Rescale target (long side, short side) before the random ratio: an image is resized, keeping its aspect
    ratio, to the largest size with long side <= long * r and short side <= short * r (mmseg's keep_ratio)."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    """The random ratio r, uniform in this range."""
    cat_max_ratio: float = 0.75
    """Redraw a crop (up to 10 times) while one class covers more than this fraction of its labelled pixels;
    1.0 disables the check."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    photometric: bool = True
    """mmseg's PhotoMetricDistortion: random brightness, contrast, saturation and hue, each with p = 0.5."""
    eval_scale: tuple[int, int] | None = (2048, 512)
    """Evaluation: rescale the image to (long, short) as above with r = 1 before sliding windows (the logits
    are resized back to the label's size for scoring); None = evaluate at the stored size."""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    num_workers: int = 4
    """DataLoader worker processes (0 = load in the training process)."""
    pin_memory: bool = True
    """Page-locked host memory for faster copies (only when CUDA is available)."""
    shuffle: bool = True
    seed: int = 0
    """Seed of the epoch order and of every sample's augmentation."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Refuse images with more pixels than this (decompression-bomb guard, PIL's default)."""
    max_bad_fraction: float = DataConfig.max_bad_fraction
    """Stop with an error when more than this fraction of the recent samples failed to load."""
    bad_window: int = DataConfig.bad_window
    """The failure fraction is measured over roughly this many most recent samples."""
    bad_min_samples: int = DataConfig.bad_min_samples
    """Do not judge the failure fraction before this many samples were tried in the window."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a setting is out of range (paths are checked when loading)."""
        if self.num_classes < 1 or self.num_classes > IGNORE_INDEX:
            raise ValueError(f"data.num_classes must be in [1, {IGNORE_INDEX}] (255 is the ignore label), "
                             f"got {self.num_classes}")
        if self.crop_size < 1:
            raise ValueError(f"data.crop_size must be >= 1, got {self.crop_size}")
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ValueError(f"data.ratio_range must satisfy 0 < low <= high, got {tuple(self.ratio_range)}")
        for name in ("train_scale", "eval_scale"):
            value = getattr(self, name)
            if value is not None and (len(tuple(value)) != 2 or min(value) < 1):
                raise ValueError(f"data.{name} must be two positive sizes (long side, short side), got {value}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"data.cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"data.hflip must be a probability, got {self.hflip}")
        if len(tuple(self.mean)) != 3 or len(tuple(self.std)) != 3 or min(self.std) <= 0:
            raise ValueError(f"data.mean and data.std need 3 values, std > 0; got {self.mean}, {self.std}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.bad_window < 0 or self.bad_min_samples < 0:
            raise ValueError(f"data.bad_window and data.bad_min_samples must be >= 0, got {self.bad_window}, "
                             f"{self.bad_min_samples}")


# ------------------------------------------------------------------------------------------------- files
def ade20k_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """Sorted (image, label) paths of ``split``: every image in ``images/<split>`` with its
    ``annotations/<split>/<stem>.png``. A missing folder, no images, or an image without a label is an error."""
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: the segmentation data must be in the ADE20K layout "
                f"root/images/{split}/*.jpg and root/annotations/{split}/*.png (data.root={str(root)!r})"
            )
    images = sorted(path for path in image_dir.iterdir() if path.is_file() and is_image_name(path.name))
    if not images:
        raise FileNotFoundError(f"no images in {image_dir}")
    pairs, missing = [], []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        (pairs if label.is_file() else missing).append((image, label))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(images)} images in {image_dir} have no label in {label_dir} "
            f"(e.g. {missing[0][0].name} needs {missing[0][1].name})"
        )
    return pairs


def load_label(path: str | os.PathLike, num_classes: int, reduce_zero_label: bool, *,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W) int64 label map of a single-channel PNG, in the convention of the module docstring.

    Raises:
        BadSample: the file cannot be read (missing, empty, truncated, not an image, too large).
        ValueError: the label is colour-coded or holds a value >= ``num_classes`` (a setting to fix).
    """
    image = load_untrusted(path, max_pixels=max_pixels)
    if image.mode not in LABEL_MODES:
        raise ValueError(
            f"label {path} has PNG mode {image.mode}; labels must be single-channel class indices "
            f"(mode {', '.join(LABEL_MODES)}), not colour-coded"
        )
    label = np.asarray(image).astype(np.int64)
    if reduce_zero_label:
        reduced = label - 1
        reduced[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
        label = reduced
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"label {path} has value {int(label[bad].max())} (after reduce_zero_label={reduce_zero_label}) but "
            f"data.num_classes={num_classes}: fix data.num_classes or data.reduce_zero_label"
        )
    return label


# --------------------------------------------------------------------------------------------- datasets
class SegmentationDataset(Dataset):
    """``dataset[(epoch, index)]`` -> ``{"image": (3, h, w) float32, "label": (H, W) int64, "index": int}``.

    The sample's random draws come from ``sample_rng((seed, epoch, index))``; a plain int means epoch 0.
    A pair that cannot be used (an unreadable image or label, or sizes that differ) comes back as a marker
    ``{"bad": ["path: reason"]}`` that the loader counts and skips (see the module docstring).
    """

    def __init__(self, pairs: list[tuple[Path, Path]], transform: Any, cfg: SegDataConfig):
        self.pairs = pairs
        self.transform = transform
        self.num_classes = cfg.num_classes
        self.reduce_zero_label = cfg.reduce_zero_label
        self.seed = cfg.seed
        self.max_image_pixels = cfg.max_image_pixels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        image_path, label_path = self.pairs[index]
        try:
            image = decode_image(image_path, max_pixels=self.max_image_pixels)
        except BadSample as error:
            return {"bad": [f"{image_path}: {error.reason}"]}
        try:
            label = load_label(label_path, self.num_classes, self.reduce_zero_label, max_pixels=self.max_image_pixels)
        except BadSample as error:
            return {"bad": [f"{label_path}: {error.reason}"]}
        if image.size != (label.shape[1], label.shape[0]):
            return {"bad": [f"{image_path}: the image is {image.size[0]}x{image.size[1]} but its label {label_path} "
                            f"is {label.shape[1]}x{label.shape[0]}"]}
        tensor, target = self.transform(image, label, sample_rng((self.seed, epoch, index), AUGMENT_STREAM))
        return {"image": tensor, "label": target, "index": index}


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into ``{"images": (B, 3, h, w), "labels": (B, H, W) int64, "indices": (B,)}``."""
    return {
        "images": torch.stack([sample["image"] for sample in samples]),
        "labels": torch.stack([sample["label"] for sample in samples]),
        "indices": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
    }


def build_seg_loader(cfg: SegDataConfig, purpose: str, batch_size: int = 1, *, split: str | None = None,
                     limit: int | None = None, rank: int = 0, world_size: int = 1) -> Loader:
    """The training loader (``purpose='train'``: shuffled, augmented, full batches) or the evaluation loader
    (``'eval'``: stored order, one image per batch since image sizes differ, no padding of ranks).

    ``split``: the folder under ``images/`` and ``annotations/`` (default ``cfg.train_split`` for training,
    ``validation`` for evaluation); ``limit``: only the first that many images (quick checks).

    Both are ``evamim.data.loader.Loader``: iterate it for the rest of the current epoch, resume with
    ``state_dict()``/``load_state_dict()``, read the skipped pairs from ``bad_sample_totals()``.
    """
    cfg.validate()
    if purpose == "train":
        pairs = ade20k_pairs(cfg.root, split or cfg.train_split)[:limit]
        dataset = SegmentationDataset(pairs, SegTrainTransform(cfg), cfg)
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"{len(dataset)} training images cannot fill one batch of {batch_size} per process")
        options = dict(batch_size=batch_size, shuffle=cfg.shuffle, drop_last=True, pad=True)
    elif purpose == "eval":
        if batch_size != 1:
            raise ValueError(f"evaluation loads one image per batch (sizes differ), got batch_size={batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"the validation limit must be >= 1 or null, got {limit}")
        pairs = ade20k_pairs(cfg.root, split or "validation")[:limit]
        dataset = SegmentationDataset(pairs, SegEvalTransform(cfg), cfg)
        options = dict(batch_size=1, shuffle=False, drop_last=False, pad=False)
    else:
        raise ValueError(f"unknown purpose {purpose!r}; expected 'train' or 'eval'")
    return Loader(
        dataset,
        collate_fn=collate,
        monitor=BadSampleMonitor(cfg.max_bad_fraction, cfg.bad_window, cfg.bad_min_samples),
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=True,
        **options,
    )


__all__ = [
    "IGNORE_INDEX",
    "SegDataConfig",
    "SegEvalTransform",
    "SegLoader",
    "SegTrainTransform",
    "SegmentationDataset",
    "ade20k_pairs",
    "build_seg_loader",
    "load_label",
    "photometric_distortion",
    "random_crop_box",
    "rescale_size",
]
