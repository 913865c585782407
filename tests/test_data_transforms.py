"""Transforms: same pixels as torchvision/timm, one crop for student and teacher, safe JPEG drafts."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from data_fixtures import real_photos
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from evamim.data.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, DataConfig
from evamim.data.decode import decode_image
from evamim.data.loader import build_loader
from evamim.data.mixup import BatchMixup
from evamim.data.transforms import (
    EvalTransform,
    FinetuneTransform,
    PretrainTransform,
    denormalize,
    draft_size_for_crop,
    renormalize,
    sample_crop,
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(real_photos(max_side=160)["astronaut"])


def test_pretrain_transform_matches_torchvision_resized_crop_flip_normalize(photo):
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    transform = PretrainTransform(size=48)
    rng = np.random.default_rng(0)
    flips = set()
    for _ in range(6):
        params = transform.sample_params(photo.width, photo.height, rng)
        flips.add(params.flip)
        reference = F.resized_crop(photo, params.top, params.left, params.height, params.width, [48, 48], InterpolationMode.BICUBIC)
        reference = F.hflip(reference) if params.flip else reference
        reference = F.normalize(F.to_tensor(reference), CLIP_MEAN, CLIP_STD)
        assert torch.allclose(transform.apply(photo, params), reference, atol=1e-5)
    assert flips == {True, False}


def test_crop_sampling_follows_the_configured_scale_and_ratio():
    rng = np.random.default_rng(1)
    fractions, ratios = [], []
    for _ in range(400):
        left, top, width, height = sample_crop(1000, 800, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + width <= 1000 and 0 <= top and top + height <= 800
        fractions.append(width * height / 800_000)
        ratios.append(width / height)
    assert 0.195 <= min(fractions) and max(fractions) <= 1.0 and np.mean(fractions) > 0.4
    assert 0.74 <= min(ratios) and max(ratios) <= 1.34


def test_student_and_teacher_inputs_come_from_one_crop(photo):
    """Renormalising the student's tensor gives exactly what the teacher's normalisation of the same crop gives."""
    student = PretrainTransform(size=32, mean=CLIP_MEAN, std=CLIP_STD)
    teacher = PretrainTransform(size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    x_student = student(photo, np.random.default_rng(7))
    x_teacher = teacher(photo, np.random.default_rng(7))
    assert torch.allclose(renormalize(x_student, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD), x_teacher, atol=1e-5)
    # And the pixels are those of the recorded crop, once.
    params = student.sample_params(photo.width, photo.height, np.random.default_rng(7))
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    crop = photo.crop(box).resize((32, 32), Image.Resampling.BICUBIC)
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip else crop
    pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
    assert torch.allclose(denormalize(x_student, CLIP_MEAN, CLIP_STD), pixels, atol=1e-5)


def test_batch_from_the_loader_renormalises_to_the_teacher_view_of_the_same_samples():
    """Each image in a pretrain batch is one crop; the teacher-side conversion of the batch equals the
    teacher-normalised crop of the same (seed, epoch, index)."""
    cfg = DataConfig(image_size=32, synthetic_size=8, synthetic_resolution=48, num_workers=0)
    batch = next(iter(build_loader(cfg, batch_size=4, rank=0, world_size=1)))
    loader_teacher = build_loader(DataConfig(**{**cfg.__dict__, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}), batch_size=4, rank=0, world_size=1)
    teacher_batch = next(iter(loader_teacher))
    assert torch.equal(batch["indices"], teacher_batch["indices"])
    converted = renormalize(batch["images"], CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(converted, teacher_batch["images"], atol=1e-5)
    assert not torch.allclose(batch["images"], teacher_batch["images"], atol=1e-2)


def test_eval_transform_matches_timm(photo):
    from timm.data import create_transform

    ours = EvalTransform(size=40, crop_pct=0.875)
    reference = create_transform(40, is_training=False, crop_pct=0.875, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    for image in (photo, photo.crop((0, 0, 160, 90)), photo.crop((0, 0, 70, 160))):
        assert torch.allclose(ours(image), reference(image), atol=1e-5)


def test_finetune_transform_is_timm_randaug_with_erasing(photo):
    transform = FinetuneTransform(size=32, auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    text = repr(transform)
    assert "RandAugment" in text and "RandomErasing" in text and "RandomResizedCrop" in text
    outputs = [transform(photo) for _ in range(3)]
    assert all(out.shape == (3, 32, 32) and out.dtype == torch.float32 for out in outputs)
    assert not torch.allclose(outputs[0], outputs[1])


def test_finetune_augmentation_depends_on_the_sample_rng_alone(photo):
    """Crop, flip, RandAugment's ops and magnitudes, erasing: all drawn from the sample's own generator, so an
    image is augmented alike in any worker, process or resumed run; the global generators are left as they were."""
    import random

    import numpy as np

    transform = FinetuneTransform(size=32, auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    first = transform(photo, np.random.default_rng(7))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)  # other global states: no influence
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    assert torch.equal(transform(photo, np.random.default_rng(7)), first)
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])
    others = [transform(photo, np.random.default_rng(seed)) for seed in range(8, 12)]
    assert not any(torch.equal(other, first) for other in others)


def test_mixup_makes_soft_targets_that_sum_to_one():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixup = BatchMixup(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    out = mixup({"images": images, "labels": labels})
    assert out["targets"].shape == (6, 5)
    assert torch.allclose(out["targets"].sum(1), torch.ones(6))
    assert torch.equal(out["labels"], labels) and not torch.equal(out["images"], images)
    # Each soft target puts its largest weights on the sample's own class and on its partner's.
    top2 = out["targets"].topk(2, dim=1).indices
    partner = labels.flip(0)
    for row in range(6):
        assert labels[row].item() in top2[row].tolist() or partner[row].item() in top2[row].tolist()
    with pytest.raises(ValueError, match="even batch"):
        mixup({"images": images[:5], "labels": labels[:5]})


# ---------------------------------------------------------------------------- JPEG draft


def _pil_draft_result(width: int, height: int, request: tuple[int, int]) -> tuple[int, int]:
    """What PIL's JpegImageFile.draft does with a request: the largest 1/2^k keeping both sides >= it."""
    scale = min(width // request[0], height // request[1])
    scale = next(s for s in (8, 4, 2, 1) if scale >= s)
    return -(-width // scale), -(-height // scale)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(16, 6000),
    height=st.integers(16, 6000),
    out=st.sampled_from([32, 64, 224, 336]),
    min_scale=st.sampled_from([0.08, 0.2, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_draft_never_leaves_a_crop_with_fewer_source_pixels_than_the_output(width, height, out, min_scale, seed):
    ratio = (3 / 4, 4 / 3)
    request = draft_size_for_crop(width, height, (out, out), (min_scale, 1.0), ratio)
    if request is None:
        return
    drafted = _pil_draft_result(width, height, request)
    assert drafted[0] < width  # a draft that was requested does reduce the image
    rng = np.random.default_rng(seed)
    for _ in range(20):
        _, _, crop_w, crop_h = sample_crop(*drafted, (min_scale, 1.0), ratio, rng)
        # Rounding of the crop size may cost one pixel.
        assert crop_w >= out - 1 and crop_h >= out - 1, (drafted, crop_w, crop_h)


def test_draft_decodes_web_photos_smaller_and_leaves_imagenet_sized_ones_alone():
    transform = PretrainTransform(size=224)
    assert transform.draft_size(500, 375) is None
    big = Image.fromarray(real_photos(max_side=640)["china"]).resize((1600, 1200))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    decoded = decode_image(buffer.getvalue(), max_pixels=10**9, draft_size=transform.draft_size)
    assert decoded.size == (800, 600)
    needed = 224**2 / (0.2 * 0.75)
    assert decoded.width * decoded.height >= needed and math.isclose(decoded.width / decoded.height, 4 / 3)
    full = decode_image(buffer.getvalue(), max_pixels=10**9)
    assert full.size == (1600, 1200)
    off = PretrainTransform(size=224, jpeg_draft=False)
    assert decode_image(buffer.getvalue(), max_pixels=10**9, draft_size=off.draft_size).size == (1600, 1200)


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(16, 6000),
    height=st.integers(16, 6000),
    out=st.sampled_from([32, 64, 224]),
    min_scale=st.sampled_from([0.08, 0.2, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_per_crop_draft_keeps_each_crop_at_least_output_sized(width, height, out, min_scale, seed):
    transform = PretrainTransform(size=out, scale=(min_scale, 1.0))
    plan = transform.prepare(np.random.default_rng(seed))
    request = plan.draft_size(width, height)
    params = plan.params
    if request is None:
        assert min(params.width, params.height) < 2 * out  # no 1/2 decode would have been large enough
        return
    drafted = _pil_draft_result(width, height, request)
    factor = width / drafted[0]
    assert factor >= 1.9  # really reduced (1/2, 1/4 or 1/8, up to rounding)
    assert params.width * drafted[0] / width >= out and params.height * drafted[1] / height >= out


def test_drafted_decode_shows_the_same_crop_as_a_full_decode():
    photo = Image.fromarray(real_photos(max_side=640)["china"]).resize((1600, 1200))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    drafted_sizes = set()
    for seed in range(8):
        outputs = []
        for draft in (True, False):
            transform = PretrainTransform(size=64, jpeg_draft=draft)
            plan = transform.prepare(np.random.default_rng(seed))
            image = decode_image(data, max_pixels=10**9, draft_size=plan.draft_size)
            outputs.append((plan.params, image.size, plan(image)))
        (params_a, size_a, a), (params_b, size_b, b) = outputs
        assert params_a == params_b and size_b == (1600, 1200)
        drafted_sizes.add(size_a)
        # The same part of the picture: pixels agree up to the different resampling path.
        difference = (denormalize(a, CLIP_MEAN, CLIP_STD) - denormalize(b, CLIP_MEAN, CLIP_STD)).abs()
        assert difference.mean() < 0.02, (seed, params_a, size_a, difference.mean())
    assert drafted_sizes & {(400, 300), (200, 150)}  # at 64 px most crops allow 1/4 or 1/8


def test_non_jpeg_images_get_the_crop_the_jpeg_path_would_draw():
    photo = Image.fromarray(real_photos(max_side=160)["coffee"])
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    transform = PretrainTransform(size=32)
    via_plan = transform.prepare(np.random.default_rng(3))
    decoded = decode_image(buffer.getvalue(), max_pixels=10**9, draft_size=via_plan.draft_size)
    assert via_plan.params is None  # PNG: the decoder never asked for a draft
    assert torch.equal(via_plan(decoded), transform(photo, np.random.default_rng(3)))
