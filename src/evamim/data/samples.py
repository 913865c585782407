"""What flows from a source to the collate step, and the per-sample random streams.

A source yields a ``RawSample`` (decoded RGB image plus optional label and caption). The dataset
turns it into a sample dict with ``make_sample``; the collate step stacks those into a batch.

Randomness is per sample, not per worker: a sample's crop and mask come from generators seeded by
``(seed, epoch, sample id, stream)``, so they are the same whatever the number of workers or ranks,
and a resumed run reproduces them exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from evamim.data.decode import BadSample, transform_guard

# Separate streams so that the crop and the mask of a sample are independent draws.
AUGMENT_STREAM = 0
MASK_STREAM = 1


@dataclasses.dataclass
class RawSample:
    """One decoded sample before augmentation."""

    image: Image.Image
    """RGB, fully loaded."""
    label: int | None = None
    caption: str | None = None


def sample_rng(seed_key: tuple[int, ...], stream: int) -> np.random.Generator:
    """The generator of one sample's ``stream``; ``seed_key`` is ``(seed, epoch, sample id)``."""
    return np.random.default_rng([*seed_key, stream])


def make_sample(
    raw: RawSample,
    plan: Any,
    seed_key: tuple[int, int, int],
    *,
    labels: bool,
    captions: bool,
    where: str,
) -> dict[str, Any]:
    """Augment one raw sample with its transform ``plan`` into the dict the collate step expects.

    ``plan`` is ``transform.prepare(sample_rng(seed_key, AUGMENT_STREAM))``, the same plan the
    image was decoded with. Returns ``{"image": (3, H, W) tensor (float, or uint8 pixels), "seed_key": ...,
    "label": int, "caption": str}``; ``label``/``caption`` only when asked for.

    Raises:
        BadSample: when a label or caption is asked for but the sample has none, or
            ``TransformFailed`` (a ``BadSample``) when the transform raises on this image.
    """
    sample: dict[str, Any] = {"seed_key": seed_key}
    if labels:
        if raw.label is None:
            raise BadSample(f"no label (data.labels is on) in {where}")
        sample["label"] = int(raw.label)
    if captions:
        if raw.caption is None:
            raise BadSample(f"no caption (data.captions is on) in {where}")
        sample["caption"] = raw.caption
    with transform_guard():
        sample["image"] = plan(raw.image)
    return sample
