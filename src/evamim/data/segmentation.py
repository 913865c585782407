"""Semantic-segmentation data in the ADE20K folder layout: pairs, joint augmentation, resumable loaders.

Layout (``SegDataConfig.root``)::

    images/<split>/<name>.jpg          RGB images (any format PIL reads)
    annotations/<split>/<name>.png     single-channel labels (PNG mode L or P), same file stem

Label convention once loaded: an (H, W) int64 map whose values 0..K-1 are classes and 255 is *ignore*
(``IGNORE_INDEX``: no loss, not scored). ADE20K stores 0 for "other" and 1..150 for its classes, so with
``reduce_zero_label`` (ADE20K's convention, on by default) a stored 0 becomes 255 and a stored v in 1..K
becomes v - 1; a stored 255 stays 255. Any other value >= K is an error naming the file.

Training samples (mmsegmentation's ADE20K pipeline): random rescale keeping the aspect ratio, random
crop (retried so that no class covers more than ``cat_max_ratio`` of it), horizontal flip, photometric
distortion, normalisation, and padding to the crop size (image 0 = the mean colour, label 255). The
image is resampled bilinearly, the label with nearest neighbour, with the same geometry. Each sample's
random draws come from a generator seeded by ``(seed, epoch, index)``, so a resumed run repeats them.
Evaluation samples: the image (optionally rescaled by ``eval_scale``) and the label at its original
size; scoring happens at the label's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset

from evamim.data.config import CLIP_MEAN, CLIP_STD
from evamim.data.decode import BadSample, decode_image
from evamim.data.files import is_image_name
from evamim.data.sampler import ResumableDistributedSampler
from evamim.data.samples import AUGMENT_STREAM, sample_rng


IGNORE_INDEX = 255
LABEL_MODES = ("L", "P", "I", "I;16")
STATE_FORMAT = 1


@dataclass
class SegDataConfig:
    """Where the segmentation data is and how it is augmented and loaded."""

    root: str = ""
    """Dataset root holding ``images/<split>/`` and ``annotations/<split>/`` (ADE20K: ADEChallengeData2016)."""
    train_split: str = "training"
    val_split: str = "validation"
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
    val_limit: int | None = None
    """Evaluate on the first N validation images only (quick checks); None = all."""
    max_image_pixels: int = 89_478_485
    """Refuse images with more pixels than this (decompression-bomb guard, PIL's default)."""

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
        if self.val_limit is not None and self.val_limit < 1:
            raise ValueError(f"data.val_limit must be >= 1 or null, got {self.val_limit}")


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


def load_label(path: str | os.PathLike, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """(H, W) int64 label map of a single-channel PNG, in the convention of the module docstring."""
    with Image.open(path) as image:
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


# -------------------------------------------------------------------------------------------- transforms
def rescale_size(width: int, height: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """(width, height) resized keeping the aspect ratio so that long <= scale[0] * ratio and
    short <= scale[1] * ratio, with at least one of them reached (mmseg's keep_ratio rescale)."""
    long_target, short_target = max(scale) * ratio, min(scale) * ratio
    factor = min(long_target / max(width, height), short_target / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an (H, W, 3) uint8 RGB array -> uint8: brightness +-32, contrast
    x[0.5, 1.5] (before or after the colour changes), saturation x[0.5, 1.5], hue +-18 degrees; each p = 0.5."""
    pixels = image.astype(np.float32)
    if rng.random() < 0.5:
        pixels = pixels + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5

    def contrast(values: np.ndarray) -> np.ndarray:
        return values * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else values

    if contrast_first:
        pixels = contrast(pixels)
    saturate, shift_hue = rng.random() < 0.5, rng.random() < 0.5
    if saturate or shift_hue:
        hsv = np.asarray(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if shift_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256 / 360) % 256  # PIL's hue is 0..255
        pixels = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first:
        pixels = contrast(pixels)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _normalize(image: np.ndarray, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised with mean/std given for [0, 1] pixels."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)  # a writable copy
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def random_crop_box(label: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float) -> tuple[int, int]:
    """Top-left (y, x) of a crop of up to ``crop`` x ``crop``; redrawn up to 10 times while one class
    covers more than ``cat_max_ratio`` of the crop's labelled pixels (mmseg's RandomCrop)."""
    height, width = label.shape
    for _ in range(10):
        y = int(rng.integers(0, max(height - crop, 0) + 1))
        x = int(rng.integers(0, max(width - crop, 0) + 1))
        if cat_max_ratio >= 1.0:
            break
        window = label[y : y + crop, x : x + crop]
        counts = np.bincount(window[window != IGNORE_INDEX].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y, x


class SegTrainTransform:
    """(RGB image, (H, W) int64 label, rng) -> (image (3, c, c) float32, label (c, c) int64), c = crop size."""

    def __init__(self, cfg: SegDataConfig):
        self.crop = cfg.crop_size
        self.scale = tuple(cfg.train_scale)
        self.ratio_range = tuple(cfg.ratio_range)
        self.cat_max_ratio = cfg.cat_max_ratio
        self.hflip = cfg.hflip
        self.photometric = cfg.photometric
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator):
        size = rescale_size(*image.size, self.scale, rng.uniform(*self.ratio_range))
        image = image.resize(size, Image.Resampling.BILINEAR)
        # Labels fit in 8 bits (0..K-1 and 255), so PIL can resize them with nearest neighbour.
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
        pixels = np.asarray(image)
        y, x = random_crop_box(label, self.crop, rng, self.cat_max_ratio)
        pixels, label = pixels[y : y + self.crop, x : x + self.crop], label[y : y + self.crop, x : x + self.crop]
        if rng.random() < self.hflip:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
        tensor = _normalize(pixels, self.mean, self.std)
        target = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        pad_h, pad_w = self.crop - tensor.shape[1], self.crop - tensor.shape[2]
        if pad_h or pad_w:  # an image smaller than the crop: pad bottom/right, the label with "ignore"
            tensor = torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)
            target = torch.nn.functional.pad(target, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return tensor, target


class SegEvalTransform:
    """(RGB image, (H, W) label, rng) -> (image (3, h, w) float32 rescaled by ``eval_scale``, label (H, W) int64
    at the stored size)."""

    def __init__(self, cfg: SegDataConfig):
        self.scale = tuple(cfg.eval_scale) if cfg.eval_scale is not None else None
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None):
        if self.scale is not None:
            image = image.resize(rescale_size(*image.size, self.scale), Image.Resampling.BILINEAR)
        return _normalize(np.asarray(image), self.mean, self.std), torch.from_numpy(label)


# --------------------------------------------------------------------------------------------- datasets
class SegmentationDataset(Dataset):
    """``dataset[(epoch, index)]`` -> ``{"image": (3, h, w) float32, "label": (H, W) int64, "index": int}``.

    The sample's random draws come from ``sample_rng((seed, epoch, index))``; a plain int means epoch 0.
    An unreadable image or label raises with its path (no silent replacement: a segmentation set is small
    enough to fix).
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
            raise ValueError(f"cannot read image {image_path}: {error.reason}") from None
        label = load_label(label_path, self.num_classes, self.reduce_zero_label)
        if image.size != (label.shape[1], label.shape[0]):
            raise ValueError(
                f"image {image_path} is {image.size[0]}x{image.size[1]} but its label {label_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        tensor, target = self.transform(image, label, sample_rng((self.seed, epoch, index), AUGMENT_STREAM))
        return {"image": tensor, "label": target, "index": index}


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into ``{"images": (B, 3, h, w), "labels": (B, H, W) int64, "indices": (B,)}``."""
    return {
        "images": torch.stack([sample["image"] for sample in samples]),
        "labels": torch.stack([sample["label"] for sample in samples]),
        "indices": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
    }


class SegLoader:
    """Batches of a ``SegmentationDataset``, one epoch per iteration, resumable mid-epoch.

    Iterating runs the current epoch from the current position and then moves to the next epoch;
    ``state_dict()`` is the position after the last batch handed out, ``load_state_dict`` continues from
    it with the same order and the same augmentations (the engine's data-position protocol).
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.world_size = world_size
        self.sampler = ResumableDistributedSampler(
            len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, pad=pad
        )
        # The workers' base seed comes from this generator, not the global RNG that drop path draws from.
        generator = torch.Generator().manual_seed(seed)
        self._loader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(self.sampler, batch_size, drop_last),
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory and torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
            generator=generator,
        )
        self._epoch = 0
        self._position = 0  # samples consumed in this epoch by all ranks together

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._position = epoch, 0

    def __iter__(self):
        self.sampler.set_epoch(self._epoch, min(self._position, self.sampler.total_size))
        for batch in self._loader:
            self._position += batch["images"].shape[0] * self.world_size
            yield batch
        self.set_epoch(self._epoch + 1)

    def __len__(self) -> int:
        samples = self.sampler.samples_per_epoch()
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self._epoch, "position": self._position,
                "dataset_size": len(self.dataset), "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state.get("dataset_size") != len(self.dataset):
            raise ValueError(
                f"cannot resume: the checkpoint's segmentation data state {state} does not match this dataset "
                f"({len(self.dataset)} images); resume with the same data, or use a new output directory"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])


def build_seg_loader(cfg: SegDataConfig, purpose: str, batch_size: int = 1, *, rank: int = 0,
                     world_size: int = 1) -> SegLoader:
    """The training loader (``purpose='train'``: shuffled, augmented, full batches) or the evaluation loader
    (``'eval'``: stored order, one image per batch since image sizes differ, no padding of ranks)."""
    cfg.validate()
    if purpose == "train":
        pairs = ade20k_pairs(cfg.root, cfg.train_split)
        dataset = SegmentationDataset(pairs, SegTrainTransform(cfg), cfg)
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"{len(dataset)} training images cannot fill one batch of {batch_size} per process")
        return SegLoader(dataset, batch_size=batch_size, shuffle=cfg.shuffle, drop_last=True, seed=cfg.seed,
                         num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, rank=rank, world_size=world_size)
    if purpose == "eval":
        if batch_size != 1:
            raise ValueError(f"evaluation loads one image per batch (sizes differ), got batch_size={batch_size}")
        pairs = ade20k_pairs(cfg.root, cfg.val_split)[: cfg.val_limit]
        dataset = SegmentationDataset(pairs, SegEvalTransform(cfg), cfg)
        return SegLoader(dataset, batch_size=1, shuffle=False, drop_last=False, seed=cfg.seed,
                         num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, rank=rank, world_size=world_size,
                         pad=False)
    raise ValueError(f"unknown purpose {purpose!r}; expected 'train' or 'eval'")


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
    "rescale_size",
]
