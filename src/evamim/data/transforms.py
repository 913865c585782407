"""Image transforms: PIL image in, normalised ``(3, H, W)`` float tensor out (or uint8 pixels, below).

Three recipes:
- ``PretrainTransform``: RandomResizedCrop (EVA: scale (0.2, 1), ratio (3/4, 4/3), bicubic) and a
  horizontal flip, then normalisation with the student's mean/std (CLIP's by default).
- ``FinetuneTransform``: timm's ImageNet training recipe (RandomResizedCrop, flip, RandAugment,
  random erasing); mixup/cutmix act on whole batches (``evamim.data.mixup``).
- ``EvalTransform``: resize the shorter side to ``size / crop_pct``, centre-crop ``size``.

The student and the teacher see the same crop. The pre-training transform makes one crop and
returns it once, normalised for the student; a teacher that expects another normalisation converts
the batch tensor with ``renormalize`` (an exact affine map of the same pixels), so there is never a
second crop to keep in sync.

uint8 output: the pre-training and evaluation transforms take ``output="uint8"`` and then return the
crop's pixels as ``(3, H, W)`` uint8 (exactly the pixels the float output normalises) instead of
normalised float32. The pre-training task uses it: the workers hand a quarter of the bytes to the
training process, which copies them to the accelerator and normalises there
(``evamim.data.image_ops.normalize_on_device``, the same numbers as the float output). The
fine-tuning transform stays float: its random erasing acts on normalised images.

Every transform takes an optional ``numpy.random.Generator``. The pre-training and evaluation
transforms draw all their randomness from it, so a sample's crop is reproducible from its seed;
the fine-tuning transform uses timm's own (per-worker) randomness.

JPEG draft decoding: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 scale for much less work than
decoding it fully and shrinking it afterwards. A dataset calls ``transform.prepare(rng)`` once per
sample and decodes with the plan's ``draft_size(width, height)``; the pre-training plan draws the
crop from the image's header size *before* decoding and picks the largest reduction that still
leaves that crop at least ``size`` pixels per side (see ``PretrainPlan``). Transforms whose crop is
drawn after decoding use a bound valid for every crop they could draw (``draft_size_for_crop``).

This module holds the pre-training and evaluation recipes and ``build_transform``; the transform
protocol, tensor conversion, crops and draft sizes are in ``evamim.data.image_ops``, the fine-tuning
recipe in ``evamim.data.randaugment``. Every name stays importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from evamim.constants import CLIP_MEAN, CLIP_STD
from evamim.data.config import DataConfig
from evamim.data.image_ops import (
    INTERPOLATION,
    CallableTransform,
    OUTPUTS,
    CropParams,
    ImageTransform,
    SamplePlan,
    as_image_transform,
    check_output,
    denormalize,
    draft_size_for_crop,
    draft_size_for_resize,
    renormalize,
    normalize_on_device,
    sample_crop,
    to_normalized_tensor,
    to_output_tensor,
    to_uint8_tensor,
)
from evamim.data.randaugment import FinetuneTransform, patch_posterize, posterize_keeping_bits


class PretrainTransform(ImageTransform):
    """RandomResizedCrop + horizontal flip + normalisation: one crop shared by student and teacher.

    Output: ``(3, size, size)`` float32 normalised with ``mean``/``std`` (the student's), or with
    ``output="uint8"`` the crop's pixels as uint8 (``normalize_on_device`` with the same mean/std then
    gives the float output's numbers). The teacher gets the same tensor and renormalises it itself
    (``renormalize``); there is no second crop.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        jpeg_draft: bool = True,
        output: str = "float",
    ):
        self.size = int(size)
        self.output = check_output(output)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = INTERPOLATION[interpolation]
        self.hflip = float(hflip)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.jpeg_draft = jpeg_draft

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """A bound valid for every crop (used only when the crop is not drawn before decoding)."""
        if not self.jpeg_draft:
            return None
        return draft_size_for_crop(width, height, (self.size, self.size), self.scale, self.ratio)

    def prepare(self, rng: np.random.Generator) -> PretrainPlan:
        return PretrainPlan(self, rng)

    def draft_factor(self, params: CropParams) -> int:
        """Largest 1/k reduction (k in 1, 2, 4, 8) keeping the crop >= ``size`` pixels per side."""
        if not self.jpeg_draft:
            return 1
        factor = 1
        while factor < 8 and min(params.width, params.height) >= 2 * factor * self.size:
            factor *= 2
        return factor

    def sample_params(self, width: int, height: int, rng: np.random.Generator) -> CropParams:
        left, top, crop_w, crop_h = sample_crop(width, height, self.scale, self.ratio, rng)
        return CropParams(left, top, crop_w, crop_h, flip=bool(rng.random() < self.hflip))

    def apply(self, image: Image.Image, params: CropParams) -> torch.Tensor:
        """Crop, resize and flip ``image`` as ``params`` say, then normalise (or keep uint8, see ``output``)."""
        box = (params.left, params.top, params.left + params.width, params.top + params.height)
        # Crop, then resize (not resize(box=...), which lets the filter reach outside the crop): the
        # same pixels as torchvision's resized_crop, so either can serve as the other's reference.
        out = image.crop(box).resize((self.size, self.size), self.interpolation)
        if params.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_output_tensor(out, self.output, self.mean, self.std)

    def apply_to_reduced(self, image: Image.Image, params: CropParams, source_size: tuple[int, int]) -> torch.Tensor:
        """Apply ``params``, drawn for an image of ``source_size``, to a reduced decode of it."""
        if image.size == tuple(source_size):
            return self.apply(image, params)
        sx, sy = image.width / source_size[0], image.height / source_size[1]
        # Sub-pixel box: the crop covers the same part of the picture as at full size.
        box = (params.left * sx, params.top * sy, (params.left + params.width) * sx, (params.top + params.height) * sy)
        out = image.resize((self.size, self.size), self.interpolation, box=box)
        if params.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_output_tensor(out, self.output, self.mean, self.std)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = np.random.default_rng() if rng is None else rng
        return self.apply(image, self.sample_params(image.width, image.height, rng))

    def __repr__(self) -> str:
        return (
            f"PretrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation.name.lower()}, hflip={self.hflip}, mean={self.mean}, std={self.std}, "
            f"output={self.output})"
        )


class PretrainPlan(SamplePlan):
    """Draws the crop from the header size before decoding, so the decode can be reduced per crop.

    ``draft_size(width, height)`` (called by the decoder for JPEGs) draws the crop in full-size
    pixels and asks for a 1/k decode, k the largest power of two (up to 8) that leaves the crop at
    least ``size`` pixels per side: the crop then covers the same part of the picture as without a
    draft, and is never upsampled because of it. A 1600 x 1200 photo is decoded at 1/2 or 1/4
    depending on the crop; a 500 x 375 one at full size (its crops are too small to halve) for 224 px.
    Non-JPEG images never call ``draft_size``: the crop is drawn from the decoded image instead,
    from the same generator, so the crop does not depend on whether a draft happened.
    """

    transform: PretrainTransform

    def __init__(self, transform: PretrainTransform, rng: np.random.Generator):
        super().__init__(transform, rng)
        self.params: CropParams | None = None
        self.source_size: tuple[int, int] | None = None

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        self.params = self.transform.sample_params(width, height, self.rng)
        self.source_size = (width, height)
        factor = self.transform.draft_factor(self.params)
        # Asking for (W // k, H // k) makes PIL pick exactly 1/k: W // (W // k) lies in [k, 2k).
        return None if factor == 1 else (width // factor, height // factor)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.params is None:
            return self.transform(image, self.rng)
        return self.transform.apply_to_reduced(image, self.params, self.source_size)


class EvalTransform(ImageTransform):
    """Resize the shorter side to ``floor(size / crop_pct)``, centre-crop ``size``, normalise.

    Matches timm's ``transforms_imagenet_eval`` (same rounding); deterministic, ``rng`` unused. With
    ``output="uint8"`` the crop's pixels come out as uint8 instead (as ``PretrainTransform``).
    """

    def __init__(
        self,
        size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        jpeg_draft: bool = True,
        output: str = "float",
    ):
        self.size = int(size)
        self.output = check_output(output)
        self.crop_pct = float(crop_pct)
        self.resize_to = math.floor(self.size / self.crop_pct)
        self.interpolation = INTERPOLATION[interpolation]
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.jpeg_draft = jpeg_draft

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        return draft_size_for_resize(width, height, self.resize_to) if self.jpeg_draft else None

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize_to * long / short)  # torchvision's rounding (truncation)
        new_w, new_h = (self.resize_to, new_long) if width <= height else (new_long, self.resize_to)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self.interpolation)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        return to_output_tensor(image, self.output, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(size={self.size}, crop_pct={self.crop_pct}, mean={self.mean}, std={self.std}, "
            f"output={self.output})"
        )


PURPOSES = ("pretrain", "finetune", "eval")


def build_transform(cfg: DataConfig, purpose: str = "pretrain", output: str = "float") -> ImageTransform:
    """The transform for ``purpose`` (pretrain, finetune or eval) configured from ``cfg``.

    ``output``: ``float`` (normalised float32) or ``uint8`` (the pixels, to be normalised on the device
    with ``normalize_on_device(images, cfg.mean, cfg.std)``); ``finetune`` is float only.
    """
    check_output(output)
    if purpose == "finetune" and output != "float":
        raise ValueError(
            "the finetune transform only gives normalised floats (its random erasing and mixup act on them): "
            "build it with output='float'"
        )
    common = dict(
        size=cfg.image_size,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        jpeg_draft=cfg.jpeg_draft,
    )
    if purpose == "pretrain":
        return PretrainTransform(
            scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, output=output, **common
        )
    if purpose == "finetune":
        return FinetuneTransform(
            scale=tuple(cfg.finetune_crop_scale),
            ratio=tuple(cfg.crop_ratio),
            hflip=cfg.hflip,
            auto_augment=cfg.auto_augment,
            random_erasing=cfg.random_erasing,
            **common,
        )
    if purpose == "eval":
        return EvalTransform(crop_pct=cfg.crop_pct, output=output, **common)
    raise ValueError(f"unknown transform purpose {purpose!r}; expected one of {', '.join(PURPOSES)}")


# The image helpers and the fine-tuning transform live in their own modules; they stay importable here.
__all__ = [
    "INTERPOLATION",
    "OUTPUTS",
    "PURPOSES",
    "CallableTransform",
    "CropParams",
    "EvalTransform",
    "FinetuneTransform",
    "ImageTransform",
    "PretrainPlan",
    "PretrainTransform",
    "SamplePlan",
    "as_image_transform",
    "build_transform",
    "check_output",
    "denormalize",
    "draft_size_for_crop",
    "draft_size_for_resize",
    "patch_posterize",
    "posterize_keeping_bits",
    "normalize_on_device",
    "renormalize",
    "sample_crop",
    "to_normalized_tensor",
    "to_output_tensor",
    "to_uint8_tensor",
]
