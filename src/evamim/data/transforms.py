"""Image transforms: PIL image in, normalised ``(3, H, W)`` float tensor out.

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

Every transform takes an optional ``numpy.random.Generator``. The pre-training and evaluation
transforms draw all their randomness from it, so a sample's crop is reproducible from its seed;
the fine-tuning transform uses timm's own (per-worker) randomness.

JPEG draft decoding: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 scale for much less work than
decoding it fully and shrinking it afterwards. A dataset calls ``transform.prepare(rng)`` once per
sample and decodes with the plan's ``draft_size(width, height)``; the pre-training plan draws the
crop from the image's header size *before* decoding and picks the largest reduction that still
leaves that crop at least ``size`` pixels per side (see ``PretrainPlan``). Transforms whose crop is
drawn after decoding use a bound valid for every crop they could draw (``draft_size_for_crop``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from evamim.constants import CLIP_MEAN, CLIP_STD
from evamim.data.config import DataConfig

INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageTransform:
    """Base of evamim transforms: ``transform(image, rng) -> (3, H, W) float tensor``."""

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """Smallest (width, height) a JPEG of this size may be decoded at; None = full size."""
        return None

    def prepare(self, rng: np.random.Generator) -> SamplePlan:
        """The plan for one sample: ``plan.draft_size`` guides the decoder, ``plan(image)`` transforms."""
        return SamplePlan(self, rng)


class SamplePlan:
    """One sample's transform: ``draft_size(w, h)`` for the decoder, then ``plan(image) -> tensor``."""

    def __init__(self, transform: ImageTransform, rng: np.random.Generator):
        self.transform = transform
        self.rng = rng

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        return self.transform.draft_size(width, height)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image, self.rng)


class CallableTransform(ImageTransform):
    """Adapts any ``callable(PIL image) -> tensor`` (e.g. a torchvision Compose); no JPEG draft."""

    def __init__(self, function: Callable[[Image.Image], torch.Tensor]):
        self.function = function

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.function(image)

    def __repr__(self) -> str:
        return f"CallableTransform({self.function!r})"


def as_image_transform(transform: Any) -> ImageTransform:
    """``transform`` itself if it is an ``ImageTransform``, else wrapped in ``CallableTransform``."""
    if isinstance(transform, ImageTransform):
        return transform
    if not callable(transform):
        raise TypeError(f"transform must be callable(PIL image) -> tensor, got {type(transform).__name__}")
    return CallableTransform(transform)


# ---------------------------------------------------------------------------------------------
# Tensor conversion and renormalisation


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float32, ``(pixel / 255 - mean) / std`` per channel."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).to(torch.float32)
    # One fused multiply-add instead of /255, -mean, /std: three passes over the image become two.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return tensor.mul_(scale).add_(shift)


def renormalize(
    images: torch.Tensor,
    from_mean: Sequence[float],
    from_std: Sequence[float],
    to_mean: Sequence[float],
    to_std: Sequence[float],
) -> torch.Tensor:
    """Re-express images normalised with ``from_*`` as if normalised with ``to_*``.

    ``images``: ``(..., 3, H, W)``; the same pixels, only the affine normalisation changes:
    ``((x * from_std + from_mean) - to_mean) / to_std``. This is how a teacher trained with another
    mean/std sees exactly the student's crop.
    """
    shape = (3, 1, 1)
    device, dtype = images.device, images.dtype
    fm, fs, tm, ts = (
        torch.as_tensor(tuple(v), dtype=dtype, device=device).view(shape) for v in (from_mean, from_std, to_mean, to_std)
    )
    return images * (fs / ts) + (fm - tm) / ts


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels in [0, 1] back from normalised ``(..., 3, H, W)`` images."""
    return renormalize(images, mean, std, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Crops and draft sizes


@dataclass(frozen=True)
class CropParams:
    """A crop in pixels of the image it was drawn for (after any JPEG draft), and the flip."""

    left: int
    top: int
    width: int
    height: int
    flip: bool


def sample_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) of a RandomResizedCrop, drawn from ``rng``.

    torchvision's algorithm: up to 10 tries of an area fraction uniform in ``scale`` and an aspect
    ratio log-uniform in ``ratio``; if none fits, a centre crop of the whole image with the aspect
    ratio clamped to ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def draft_size_for_crop(
    width: int,
    height: int,
    output: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int] | None:
    """Smallest decode size that keeps every RandomResizedCrop at >= ``output`` source pixels.

    ``output`` is (out_width, out_height). A crop of area fraction ``s`` and aspect ``r`` of an
    image of area ``A`` is ``sqrt(s A r)`` wide and ``sqrt(s A / r)`` high; over the allowed ranges
    the narrowest is ``sqrt(s_min A r_min)`` and the shortest ``sqrt(s_min A / r_max)``. So a decoded
    area ``A >= max(out_w^2 / (s_min r_min), out_h^2 r_max / s_min)``, at the image's own aspect
    ratio, means no crop ever has fewer source pixels than the output (no upsampling introduced by
    the draft); each side is also kept >= the output side for the centre-crop fallback.
    For 224 px, scale (0.2, 1) and ratio (3/4, 4/3) that is about 334k pixels (668 x 501 at 4:3):
    a 1600 x 1200 photo decodes at 800 x 600, a 500 x 375 one at full size.

    The trade-off: crops that would have been *downscaled* from many more pixels are downscaled
    from fewer (libjpeg's DCT scaling acts as a box pre-filter). The output resolution, and so what
    the student and teacher can see, is unchanged. Returns None when no 2x reduction is possible.
    """
    out_w, out_h = output
    needed_area = max(out_w**2 / (scale[0] * ratio[0]), out_h**2 * ratio[1] / scale[0])
    aspect = width / height
    need_w = max(out_w, math.ceil(math.sqrt(needed_area * aspect)))
    need_h = max(out_h, math.ceil(math.sqrt(needed_area / aspect)))
    return _draft_or_none(width, height, need_w, need_h)


def draft_size_for_resize(width: int, height: int, shorter_side: int) -> tuple[int, int] | None:
    """Smallest decode size whose shorter side is still >= ``shorter_side`` (evaluation resize)."""
    aspect = width / height
    if width <= height:
        need_w, need_h = shorter_side, math.ceil(shorter_side / aspect)
    else:
        need_w, need_h = math.ceil(shorter_side * aspect), shorter_side
    return _draft_or_none(width, height, need_w, need_h)


def _draft_or_none(width: int, height: int, need_w: int, need_h: int) -> tuple[int, int] | None:
    # libjpeg only scales by 1/2, 1/4, 1/8, and PIL picks the largest that keeps both sides >= the
    # request; when even 1/2 is too small there is nothing to gain.
    if width < 2 * need_w or height < 2 * need_h:
        return None
    return need_w, need_h


# ---------------------------------------------------------------------------------------------
# The three recipes


class PretrainTransform(ImageTransform):
    """RandomResizedCrop + horizontal flip + normalisation: one crop shared by student and teacher.

    Output: ``(3, size, size)`` float32 normalised with ``mean``/``std`` (the student's). The teacher
    gets the same tensor and renormalises it itself (``renormalize``); there is no second crop.
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
    ):
        self.size = int(size)
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
        """Crop, resize and flip ``image`` as ``params`` say, then normalise."""
        box = (params.left, params.top, params.left + params.width, params.top + params.height)
        # Crop, then resize (not resize(box=...), which lets the filter reach outside the crop): the
        # same pixels as torchvision's resized_crop, so either can serve as the other's reference.
        out = image.crop(box).resize((self.size, self.size), self.interpolation)
        if params.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(out, self.mean, self.std)

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
        return to_normalized_tensor(out, self.mean, self.std)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = np.random.default_rng() if rng is None else rng
        return self.apply(image, self.sample_params(image.width, image.height, rng))

    def __repr__(self) -> str:
        return (
            f"PretrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation.name.lower()}, hflip={self.hflip}, mean={self.mean}, std={self.std})"
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

    Matches timm's ``transforms_imagenet_eval`` (same rounding); deterministic, ``rng`` unused.
    """

    def __init__(
        self,
        size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        jpeg_draft: bool = True,
    ):
        self.size = int(size)
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
        return to_normalized_tensor(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, crop_pct={self.crop_pct}, mean={self.mean}, std={self.std})"


class FinetuneTransform(ImageTransform):
    """timm's ImageNet training transform: RandomResizedCrop, flip, RandAugment, random erasing.

    Output ``(3, size, size)`` float32, normalised. Randomness comes from timm (Python's ``random``
    and torch's generator, seeded per DataLoader worker), so crops are not reproduced on resume.
    timm's posterize operations are swapped for ``posterize_keeping_bits`` (see there), which
    Pillow 13 no longer crashes on.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        random_erasing: float = 0.25,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        jpeg_draft: bool = True,
    ):
        from timm.data import create_transform

        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.jpeg_draft = jpeg_draft
        self.timm_transform = create_transform(
            input_size=self.size,
            is_training=True,
            scale=self.scale,
            ratio=self.ratio,
            hflip=hflip,
            auto_augment=auto_augment,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=random_erasing,
            re_mode="pixel",
            re_count=1,
        )
        patch_posterize(self.timm_transform)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        if not self.jpeg_draft:
            return None
        return draft_size_for_crop(width, height, (self.size, self.size), self.scale, self.ratio)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.timm_transform(image)

    def __repr__(self) -> str:
        return f"FinetuneTransform({self.timm_transform!r})"


def posterize_keeping_bits(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of every channel, for any count from 0 to 8.

    timm's RandAugment ``PosterizeIncreasing`` asks for 4 - int(0.4 x magnitude) bits: 0 bits when
    the magnitude reaches 10 (with ``rand-m9-mstd0.5`` the drawn magnitude is clipped to 10 about 2% of
    the time, so roughly 4 in 2,000 images). Pillow up to 12 kept 0 bits, which gives an all-black
    image; Pillow 13 raises ValueError for it and the run died. Asking Pillow for 1 bit instead
    would not be faithful (it keeps 0 or 128 per channel, a visibly different image), so 0 bits here
    is black, exactly what the recipe did when it was published. 1 to 7 bits go to Pillow as before.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    from PIL import ImageOps

    return ImageOps.posterize(image, bits_to_keep)


def patch_posterize(timm_transform: Any) -> int:
    """Swap ``posterize_keeping_bits`` into every timm posterize op found in ``timm_transform``.

    Works on the ops of RandAugment, AutoAugment and AugMix wherever they sit in a Compose.
    Returns how many ops were patched.
    """
    from timm.data import auto_augment

    patched = 0
    for op in _augment_ops(timm_transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize_keeping_bits
            patched += 1
    return patched


def _augment_ops(node: Any) -> list[Any]:
    """timm ``AugmentOp`` instances below ``node`` (Compose.transforms, RandAugment/AugMix ops,
    AutoAugment policy: lists of lists of ops)."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(node, AugmentOp):
        return [node]
    if isinstance(node, (list, tuple)):
        return [op for child in node for op in _augment_ops(child)]
    return [op for name in ("transforms", "ops", "policy") for op in _augment_ops(getattr(node, name, None) or [])]


PURPOSES = ("pretrain", "finetune", "eval")


def build_transform(cfg: DataConfig, purpose: str = "pretrain") -> ImageTransform:
    """The transform for ``purpose`` (pretrain, finetune or eval) configured from ``cfg``."""
    common = dict(
        size=cfg.image_size,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        jpeg_draft=cfg.jpeg_draft,
    )
    if purpose == "pretrain":
        return PretrainTransform(scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, **common)
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
        return EvalTransform(crop_pct=cfg.crop_pct, **common)
    raise ValueError(f"unknown transform purpose {purpose!r}; expected one of {', '.join(PURPOSES)}")
