"""Joint augmentation of a segmentation image and its label map (mmsegmentation's ADE20K pipeline).

Training (``SegTrainTransform``): random rescale keeping the aspect ratio, random crop (retried so that
no class covers more than ``cat_max_ratio`` of it), horizontal flip, photometric distortion,
normalisation, and padding to the crop size (image 0 = the mean colour, label 255). The image is
resampled bilinearly, the label with nearest neighbour, with the same geometry; every draw comes from
the generator passed in. Evaluation (``SegEvalTransform``): the image, optionally rescaled by
``eval_scale``, and the label at its stored size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from evamim.data.segmentation import SegDataConfig

IGNORE_INDEX = 255
"""The label value that is neither trained on nor scored."""


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
