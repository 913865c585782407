"""The fine-tuning transform: timm's ImageNet training recipe with RandAugment, Pillow-13-safe.

``FinetuneTransform`` wraps timm's ``create_transform`` (RandomResizedCrop, flip, RandAugment, random
erasing); ``patch_posterize`` swaps timm's posterize op for ``posterize_keeping_bits``, which keeps 0
bits as Pillow up to 12 did instead of raising as Pillow 13 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from evamim.constants import CLIP_MEAN, CLIP_STD
from evamim.data.image_ops import ImageTransform, draft_size_for_crop


class FinetuneTransform(ImageTransform):
    """timm's ImageNet training transform: RandomResizedCrop, flip, RandAugment, random erasing.

    Output ``(3, size, size)`` float32, normalised. timm draws from Python's ``random`` and torch's global
    generator; given the sample's own ``rng`` (the loader passes one drawn from (seed, epoch, index)) both
    are seeded from it for this image alone and restored afterwards, so every image is augmented the same
    way whatever the worker, the number of processes or a resume.
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
        if rng is None:
            return self.timm_transform(image)
        import random

        # timm draws from all three global generators (RandAugment picks its ops with NumPy's).
        seed = int(rng.integers(2**63))
        saved_python, saved_numpy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.default_generator.manual_seed(seed)  # the CPU generator only: cheap, and fork_rng restores it
                return self.timm_transform(image)
        finally:
            random.setstate(saved_python)
            np.random.set_state(saved_numpy)

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
