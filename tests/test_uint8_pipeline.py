"""uint8 from the workers, normalised on the device: the same pixels and the same numbers as the float path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import real_photos
from PIL import Image

import evamim
from evamim.data.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, DataConfig
from evamim.data.decode import decode_image
from evamim.data.image_ops import normalize_on_device, to_normalized_tensor
from evamim.data.loader import build_loader
from evamim.data.transforms import EvalTransform, PretrainTransform, build_transform, denormalize
from evamim.pretrain.steps import MaskedValidation, PretrainStep


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(real_photos(max_side=160)["astronaut"])


def assert_same_numbers(pixels: torch.Tensor, normalised: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> None:
    """uint8 ``pixels`` are exactly the float output's pixels, and normalise to exactly its numbers."""
    assert pixels.dtype == torch.uint8 and normalised.dtype == torch.float32 and pixels.shape == normalised.shape
    # The float path's values un-normalised are the uint8 values (up to float rounding, far below a level).
    recovered = denormalize(normalised, mean, std) * 255
    assert torch.equal(recovered.round().to(torch.uint8), pixels) and (recovered - pixels.float()).abs().max() < 1e-3
    on_device = normalize_on_device(pixels, mean, std)
    assert on_device.dtype == torch.float32
    assert torch.allclose(on_device, normalised, rtol=0, atol=1e-6)
    assert torch.equal(on_device, normalised)  # the same fused float32 arithmetic: bit for bit on the CPU


def test_pretrain_uint8_crop_is_torchvisions_resized_crop_and_the_float_outputs_pixels(photo):
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    as_float, as_uint8 = PretrainTransform(size=48), PretrainTransform(size=48, output="uint8")
    flips = set()
    for seed in range(8):
        pixels = as_uint8(photo, np.random.default_rng(seed))
        assert_same_numbers(pixels, as_float(photo, np.random.default_rng(seed)))
        params = as_uint8.sample_params(photo.width, photo.height, np.random.default_rng(seed))
        flips.add(params.flip)
        reference = F.resized_crop(photo, params.top, params.left, params.height, params.width, [48, 48],
                                   InterpolationMode.BICUBIC)
        reference = F.hflip(reference) if params.flip else reference
        assert torch.equal(pixels, F.pil_to_tensor(reference))  # exact pixels, not just close
    assert flips == {True, False}


def test_drafted_jpeg_plan_gives_the_same_pixels_in_both_outputs(tmp_path):
    """The per-crop JPEG draft path (``PretrainPlan`` -> ``apply_to_reduced``) and the eval resize path."""
    big = Image.fromarray(real_photos(max_side=1024)["astronaut"]).resize((1024, 1024), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=92)
    as_float, as_uint8 = PretrainTransform(size=64), PretrainTransform(size=64, output="uint8")
    drafted = 0
    for seed in range(12):
        plans = [t.prepare(np.random.default_rng(seed)) for t in (as_float, as_uint8)]
        images = [decode_image(str(path), max_pixels=10**9, draft_size=plan.draft_size) for plan in plans]
        drafted += images[0].size != (1024, 1024)
        assert images[0].size == images[1].size
        assert_same_numbers(plans[1](images[1]), plans[0](images[0]))
    assert drafted > 0, "no crop was drafted: the test no longer covers apply_to_reduced"
    for mean, std in ((CLIP_MEAN, CLIP_STD), (IMAGENET_MEAN, IMAGENET_STD)):
        ev_float = EvalTransform(size=56, mean=mean, std=std)
        ev_uint8 = EvalTransform(size=56, mean=mean, std=std, output="uint8")
        for image in (big, big.crop((0, 0, 700, 300)), big.crop((0, 0, 90, 400))):
            assert_same_numbers(ev_uint8(image), ev_float(image), mean, std)


def test_normalize_on_device_passes_floats_and_refuses_other_dtypes():
    images = torch.randn(2, 3, 4, 4)
    assert normalize_on_device(images, CLIP_MEAN, CLIP_STD) is images
    assert normalize_on_device(images.half(), CLIP_MEAN, CLIP_STD).dtype == torch.float16
    with pytest.raises(TypeError, match="uint8"):
        normalize_on_device(torch.zeros(2, 3, 4, 4, dtype=torch.int32), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalize_on_device(torch.zeros(2, 4, 4, 4, dtype=torch.uint8), CLIP_MEAN, CLIP_STD)
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    expected = (pixels.double() / 255 - mean) / std
    assert torch.allclose(normalize_on_device(pixels, CLIP_MEAN, CLIP_STD).double(), expected, rtol=0, atol=1e-6)
    # The input is not modified, and a batch gives per image what to_normalized_tensor gives.
    batch = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    copy = batch.clone()
    out = normalize_on_device(batch, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(batch, copy)
    for image, normalised in zip(batch, out):
        as_pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        assert torch.equal(normalised, to_normalized_tensor(as_pil, IMAGENET_MEAN, IMAGENET_STD))


def synthetic(**overrides) -> DataConfig:
    return DataConfig(**{**dict(image_size=32, synthetic_size=12, synthetic_resolution=48, num_workers=0), **overrides})


def test_loader_uint8_batches_normalise_to_the_float_batches():
    """Same samples, crops and masks; only the images' dtype differs, and normalising on the device closes it."""
    from evamim.pretrain.masking import BlockMasking

    masks = BlockMasking((4, 4), num_masking_patches=6, min_num_patches=2)
    cfg = synthetic()
    floats = list(build_loader(cfg, batch_size=4, rank=0, world_size=1, mask_generator=masks))
    uint8s = list(build_loader(cfg, batch_size=4, rank=0, world_size=1, mask_generator=masks, output="uint8"))
    assert len(floats) == len(uint8s) == 3
    for a, b in zip(floats, uint8s):
        assert set(a) == set(b) and torch.equal(a["indices"], b["indices"]) and torch.equal(a["masks"], b["masks"])
        assert_same_numbers(b["images"], a["images"])
    # The eval purpose too (the pre-training validation loader), on real JPEG and PNG files.
    evals = [next(iter(build_loader(synthetic(), batch_size=5, purpose="eval", rank=0, world_size=1, output=out)))
             for out in ("float", "uint8")]
    assert_same_numbers(evals[1]["images"], evals[0]["images"])


def test_loader_uint8_with_workers_and_real_files(tmp_path):
    from data_fixtures import write_photo_folder

    write_photo_folder(tmp_path / "photos", max_side=120)
    cfg = DataConfig(path=str(tmp_path / "photos"), image_size=40, num_workers=1, persistent_workers=False,
                     max_bad_fraction=1.0)
    for purpose in ("pretrain", "eval"):
        batches = [list(build_loader(cfg, batch_size=2, purpose=purpose, rank=0, world_size=1, output=out))
                   for out in ("float", "uint8")]
        assert [len(b["images"]) for b in batches[0]] == [len(b["images"]) for b in batches[1]]
        for a, b in zip(*batches):
            assert torch.equal(a["indices"], b["indices"])
            assert_same_numbers(b["images"], a["images"])


def test_uint8_output_is_refused_where_it_would_be_wrong():
    with pytest.raises(ValueError, match="finetune.*float"):
        build_loader(synthetic(), batch_size=2, purpose="finetune", rank=0, world_size=1, output="uint8")
    with pytest.raises(ValueError, match="output must be one of float, uint8"):
        build_transform(synthetic(), "pretrain", output="uint16")
    with pytest.raises(ValueError, match="a transform was given"):
        build_loader(synthetic(), batch_size=2, rank=0, world_size=1, transform=PretrainTransform(32), output="uint8")
    with pytest.raises(ValueError, match="output must be one of"):
        PretrainTransform(32, output="int")


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batch, targets=None):
        self.seen.append((batch["images"], targets))
        return {"loss": batch["images"].float().mean()}


def test_pretrain_step_normalises_uint8_batches_like_the_float_path():
    cfg = synthetic(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    float_batch = next(iter(build_loader(cfg, batch_size=4, rank=0, world_size=1)))
    uint8_batch = next(iter(build_loader(cfg, batch_size=4, rank=0, world_size=1, output="uint8")))
    teacher_inputs = []

    def teacher(images):
        teacher_inputs.append(images)
        return images.flatten(1)

    step = PretrainStep(teacher, torch.device("cpu"), mean=cfg.mean, std=cfg.std)
    model = Recorder()
    step(model, uint8_batch)
    step(model, float_batch)
    (from_uint8, targets_uint8), (from_float, targets_float) = model.seen
    assert from_uint8.dtype == torch.float32 and torch.equal(from_uint8, float_batch["images"])
    assert from_float is float_batch["images"]  # a float batch passes unchanged
    assert torch.equal(teacher_inputs[0], teacher_inputs[1]) and torch.equal(targets_uint8, targets_float)
    assert uint8_batch["images"].dtype == torch.uint8  # the loader's batch itself is left alone
    with pytest.raises(TypeError, match="no mean/std"):
        PretrainStep(None, torch.device("cpu"))(Recorder(), uint8_batch)
    with pytest.raises(ValueError, match="together"):
        PretrainStep(None, torch.device("cpu"), mean=cfg.mean)


def test_pixel_mim_sees_the_same_images_from_the_uint8_path():
    """pixel_mim un-normalises the images with the data mean/std: same targets, same loss as the float path."""
    from evamim.pretrain.masking import BlockMasking
    from evamim.pretrain.objectives import ObjectiveModule, get_objective

    cfg = synthetic(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    masks = BlockMasking((4, 4), num_masking_patches=6, min_num_patches=2)
    float_batch = next(iter(build_loader(cfg, batch_size=4, rank=0, world_size=1, mask_generator=masks)))
    uint8_batch = next(iter(build_loader(cfg, batch_size=4, rank=0, world_size=1, mask_generator=masks,
                                         output="uint8")))
    torch.manual_seed(0)
    student = evamim.create_model("eva_tiny_p16", patch_size=8, img_size=32, embed_dim=32, depth=1, num_heads=2,
                                  use_mask_token=True, mim_head_dim=8 * 8 * 3, global_pool="token", num_classes=0)
    for norm_pix in (True, False):
        objective = ObjectiveModule(student, get_objective("pixel_mim", mean=cfg.mean, std=cfg.std, norm_pix=norm_pix))
        step = PretrainStep(None, torch.device("cpu"), mean=cfg.mean, std=cfg.std)
        assert torch.equal(step(objective, uint8_batch)["loss"], step(objective, float_batch)["loss"])
    # What pixel_mim un-normalises back is the crop's pixels / 255.
    seen = Recorder()
    step(seen, uint8_batch)
    pixels = seen.seen[0][0] * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    assert torch.allclose(pixels, uint8_batch["images"].float() / 255, rtol=0, atol=1e-6)


def test_validation_loader_delivers_uint8_when_the_step_normalises():
    step = PretrainStep(None, torch.device("cpu"), mean=CLIP_MEAN, std=CLIP_STD)
    spec = type("Spec", (), {"uses_masks": False})()
    validation = MaskedValidation.build(synthetic(), spec, (4, 4), step, batch_size=4, max_batches=None)
    assert next(iter(validation.loader))["images"].dtype == torch.uint8
    plain = MaskedValidation.build(synthetic(), spec, (4, 4), PretrainStep(None, torch.device("cpu")), batch_size=4,
                                   max_batches=None)
    assert next(iter(plain.loader))["images"].dtype == torch.float32
    with pytest.raises(ValueError, match="differ from the step's"):
        MaskedValidation.build(synthetic(mean=IMAGENET_MEAN, std=IMAGENET_STD), spec, (4, 4), step, batch_size=4,
                               max_batches=None)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(123)
    teacher = evamim.create_model("eva_tiny_p16", patch_size=8, img_size=32, embed_dim=48, depth=2, num_heads=2,
                                  global_pool="token")
    return evamim.save_pretrained(teacher, tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.mark.parametrize("objective", ["clip_mim", "pixel_mim"])
def test_pretraining_on_uint8_batches_gives_the_float_paths_numbers(teacher_dir, tmp_path, monkeypatch, objective):
    """The task's uint8 loaders + on-device normalisation against the float loaders of before: the same losses,
    validation scores and weights, bit for bit (on the CPU)."""
    import json

    import evamim.data.loader as loader_module
    from test_pretrain import losses, tiny_overrides

    from evamim.config import load_config
    from evamim.tasks.pretrain import PretrainConfig, run_pretrain

    build = loader_module.build_loader
    outputs = []

    def recording(*args, output="float", **kwargs):
        outputs.append(output)
        return build(*args, output=output, **kwargs)

    def float_only(*args, output="float", **kwargs):
        return build(*args, **kwargs)

    extra = [f"objective={objective}", "val_data.source=synthetic", "loop.eval_every=3", "data.mean=[0.5, 0.4, 0.3]",
             "data.std=[0.2, 0.25, 0.3]"]
    runs = {}
    for name, builder in (("uint8", recording), ("float", float_only)):
        monkeypatch.setattr(loader_module, "build_loader", builder)
        run_pretrain(load_config(PretrainConfig, None, tiny_overrides(teacher_dir, tmp_path / name, 6) + extra))
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (losses(tmp_path / name), [r["eval/loss"] for r in records if "eval/loss" in r],
                      evamim.create_model(pretrained=tmp_path / name / "model").state_dict())
    assert outputs == ["uint8", "uint8"]  # training and validation loaders
    (losses_u, evals_u, weights_u), (losses_f, evals_f, weights_f) = runs["uint8"], runs["float"]
    assert len(losses_u) == 6 and len(evals_u) == 2
    assert losses_u == losses_f and evals_u == evals_f
    assert all(torch.equal(weights_u[key], weights_f[key]) for key in weights_u)
