"""The image side of the transforms: the transform protocol, tensor conversion, crops and draft sizes.

``ImageTransform`` is what datasets call: ``prepare(rng)`` gives one sample's plan, whose
``draft_size(width, height)`` guides the JPEG decoder and whose call turns the decoded image into a
``(3, H, W)`` tensor: normalised float32, or (``output="uint8"``) the crop's pixels as uint8, which the
training process normalises on the device with ``normalize_on_device`` (a quarter of the bytes to
hand from the workers to the training process and to copy to the accelerator). The recipes built on
it live in ``evamim.data.transforms``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

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


OUTPUTS = ("float", "uint8")
"""What the built-in pre-training and evaluation transforms return: ``float`` = ``(3, H, W)`` float32
normalised with their mean/std; ``uint8`` = ``(3, H, W)`` uint8, the crop's pixels (0..255), to be
normalised on the device (``normalize_on_device``)."""


def check_output(output: str) -> str:
    """``output`` if it is one of ``OUTPUTS``; else ValueError naming the choices."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
    return output


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` uint8, its exact pixels (a contiguous copy, channels first)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float32, ``(pixel / 255 - mean) / std`` per channel."""
    tensor = to_uint8_tensor(image).to(torch.float32)
    scale, shift = _affine(tuple(float(v) for v in mean), tuple(float(v) for v in std), torch.device("cpu"))
    return tensor.mul_(scale).add_(shift)


def to_output_tensor(image: Image.Image, output: str, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``to_uint8_tensor(image)`` for ``output="uint8"``, else ``to_normalized_tensor(image, mean, std)``."""
    return to_uint8_tensor(image) if output == "uint8" else to_normalized_tensor(image, mean, std)


def normalize_on_device(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` pixels -> float32 ``(pixel / 255 - mean) / std`` per channel, where they are.

    Call it after ``images.to(device, non_blocking=True)``: the normalisation then runs on the
    accelerator, after a copy of a quarter of the float32 bytes. It computes exactly what the
    loader's float output (``to_normalized_tensor``) computes, in the same fused form
    (``pixel * (1 / (255 std)) + (-mean / std)`` in float32), so both give the same numbers (bit for
    bit on the CPU).

    A floating-point batch is returned unchanged: it is taken to be normalised already (the
    transforms' ``output="float"``, or a user's own float pipeline), so code that always calls this
    works with either kind of loader. Any other dtype raises TypeError.
    """
    if images.is_floating_point():
        return images
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_on_device takes uint8 pixels (or already normalised floats), got {images.dtype}")
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize_on_device takes (..., 3, H, W) images, got shape {tuple(images.shape)}")
    scale, shift = _affine(tuple(float(v) for v in mean), tuple(float(v) for v in std), images.device)
    return images.to(torch.float32).mul_(scale).add_(shift)


@functools.lru_cache(maxsize=32)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # One fused multiply-add instead of /255, -mean, /std: three passes over the image become two. Cached
    # per device, so a training step does not copy two tiny tensors to the accelerator every time.
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return scale.to(device), shift.to(device)


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
