"""`evamim segment`: metrics, sliding windows, heads, ADE20K-layout data, and tiny runs through the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import evamim
from evamim.cli import main
from evamim.config import ConfigError, load_config
from evamim.data.segmentation import (
    IGNORE_INDEX,
    SegDataConfig,
    SegTrainTransform,
    ade20k_pairs,
    build_seg_loader,
    load_label,
    rescale_size,
)
from evamim.engine import OptimConfig, build_optimizer
from evamim.models.seg_heads import Segmenter, SimpleFeaturePyramid, load_segmenter, slide_inference, window_starts
from evamim.tasks.segmentation import (
    ConfusionMatrix,
    SegmentConfig,
    build_segmenter,
    run_segmentation,
    segmentation_loss,
    validate,
)

COLOURS = {0: (40, 90, 200), 1: (220, 40, 40), 2: (40, 200, 60)}  # background, disc, square


def write_ade20k(root: Path, train: int = 8, val: int = 4, size: int = 48, seed: int = 0) -> Path:
    """A tiny ADE20K-layout dataset: a disc (class 1) and a square (class 2) on a background (class 0),
    stored as-is (no reduce_zero_label), with a strip of 255 ("ignore") along the top of every other label."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", train), ("validation", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros((size, size), np.uint8)
            yy, xx = np.mgrid[:size, :size]
            cy, cx, r = rng.integers(12, size - 12, 2).tolist() + [int(rng.integers(6, 11))]
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
            y, x, s = int(rng.integers(0, size - 14)), int(rng.integers(0, size - 14)), int(rng.integers(8, 14))
            label[y : y + s, x : x + s] = 2
            pixels = np.zeros((size, size, 3), np.uint8)
            for value, colour in COLOURS.items():
                pixels[label == value] = colour
            pixels = np.clip(pixels + rng.integers(-25, 25, pixels.shape), 0, 255).astype(np.uint8)
            if i % 2:
                label[:3] = IGNORE_INDEX
            Image.fromarray(pixels).save(root / "images" / split / f"{split}_{i:03d}.jpg", quality=95)
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{split}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_ade20k(tmp_path_factory.mktemp("ade"))


def tiny_backbone(**overrides):
    options = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, global_pool="")
    return evamim.create_model("eva_tiny_p16", **{**options, **overrides})


# ------------------------------------------------------------------------------------------------ metrics
def test_miou_pixel_accuracy_and_absent_classes_match_a_hand_computed_confusion_matrix():
    # 4 classes; class 3 appears in neither the labels nor the predictions; 255 pixels are not scored
    # (whatever is predicted there); class 2 is predicted once but never labelled.
    label = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255], [255, 255, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 1, 2, 3], [1, 2, 0, 0]])
    matrix = ConfusionMatrix(4)
    matrix.update(pred, label)
    # rows = label, columns = prediction, over the 9 labelled pixels
    expected = torch.tensor([[4, 1, 0, 0], [0, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(matrix.matrix, expected)
    iou = matrix.iou()
    assert iou[0].item() == pytest.approx(4 / (5 + 4 - 4))  # TP 4, label 5, predicted 4
    assert iou[1].item() == pytest.approx(3 / (4 + 4 - 3))  # TP 3, label 4, predicted 4
    assert iou[2].item() == 0.0  # predicted once, never labelled: counts as 0
    assert math.isnan(iou[3].item())  # absent from both: NaN, left out of the mean
    summary = matrix.summary()
    assert summary["mIoU"] == pytest.approx(100 * (4 / 5 + 3 / 5 + 0) / 3)
    assert summary["aAcc"] == pytest.approx(100 * 7 / 9)
    assert summary["mAcc"] == pytest.approx(100 * (4 / 5 + 3 / 4) / 2)  # classes 2, 3 never labelled
    matrix.update(pred, label)  # accumulates
    assert torch.equal(matrix.matrix, 2 * expected)
    with pytest.raises(ValueError, match="labels must be in"):
        matrix.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]))


def test_loss_ignores_255_and_is_zero_not_nan_without_labelled_pixels():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 255], [2, 255]]])
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item())
    empty = segmentation_loss(logits, torch.full((1, 2, 2), 255))
    assert empty.item() == 0.0 and empty.requires_grad


# ------------------------------------------------------------------------------------------ sliding windows
def test_sliding_window_equals_one_forward_when_the_window_covers_the_image():
    torch.manual_seed(0)
    model = Segmenter(tiny_backbone(), num_classes=3, kind="upernet", channels=16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(slide_inference(model, images, 3, window=32, stride=21), model(images))


def test_sliding_window_places_and_averages_windows_over_a_larger_image():
    assert window_starts(48, 32, 16) == [0, 16] and window_starts(50, 32, 21) == [0, 18] and window_starts(20, 32, 8) == [0]
    torch.manual_seed(0)
    pointwise = nn.Conv2d(3, 4, kernel_size=1)  # position-independent: overlapping windows agree exactly
    images = torch.randn(2, 3, 45, 70)
    calls = []

    def forward(crops):
        calls.append(crops.shape)
        assert crops.shape[-2:] == (32, 32)
        return pointwise(crops)

    with torch.no_grad():
        logits = slide_inference(forward, images, 4, window=32, stride=20, windows_per_batch=4)
        assert torch.allclose(logits, pointwise(images), atol=1e-6)
    assert len(calls) == 3 and sum(shape[0] for shape in calls) == 2 * 2 * 3  # 2 x 3 windows of 2 images

    # Every pixel's logits are the mean over the windows covering it: count them with a constant per window.
    counter = iter(range(1, 100))
    mean = slide_inference(lambda c: torch.cat([torch.full((1, 1, 32, 32), float(next(counter))) for _ in c]),
                           torch.zeros(1, 3, 48, 48), 1, window=32, stride=16, windows_per_batch=1)
    assert mean[0, 0, 0, 0] == 1 and mean[0, 0, 0, 47] == 2 and mean[0, 0, 47, 0] == 3 and mean[0, 0, 47, 47] == 4
    assert mean[0, 0, 20, 20] == pytest.approx((1 + 2 + 3 + 4) / 4) and mean[0, 0, 0, 20] == pytest.approx(1.5)


def test_sliding_window_pads_an_image_smaller_than_the_window():
    torch.manual_seed(0)
    model = Segmenter(tiny_backbone(), num_classes=3, kind="linear").eval()
    with torch.no_grad():
        logits = slide_inference(model, torch.randn(1, 3, 20, 27), 3, window=32, stride=16)
    assert logits.shape == (1, 3, 20, 27) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------- heads
def test_simple_feature_pyramid_yields_strides_4_8_16_32_from_patch_16():
    torch.manual_seed(0)
    backbone = tiny_backbone(img_size=64, patch_size=16, depth=4)
    model = Segmenter(backbone, num_classes=5, kind="upernet", indices=[0, 1, 2, 3], channels=16)
    features = model.features(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in features] == [(2, 32, 4, 4)] * 4  # stride 16
    levels = model.head.pyramid(features)
    assert [tuple(level.shape[-2:]) for level in levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [64 // level.shape[-1] for level in levels] == [4, 8, 16, 32]
    assert SimpleFeaturePyramid.scales == (4.0, 2.0, 1.0, 0.5)
    assert model.head(features).shape == (2, 5, 16, 16)  # logits at stride 4, before upsampling


@pytest.mark.parametrize("kind", ["linear", "upernet"])
def test_segmenter_gives_input_sized_logits_and_trains_every_parameter(kind):
    torch.manual_seed(0)
    model = Segmenter(tiny_backbone(), num_classes=3, kind=kind, channels=16)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    logits = model(images)
    assert logits.shape == (2, 3, 32, 32)
    segmentation_loss(logits, labels).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_segmenter_layer_decay_keeps_the_head_at_full_rate_and_decays_the_backbone():
    model = Segmenter(tiny_backbone(depth=3), num_classes=3, kind="upernet", indices=[0, 1, 2, 2], channels=16)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, layer_decay=0.5))
    by_name = {n: g for g in optimizer.param_groups for n in g["param_names"]}
    assert by_name["backbone.pos_embed"]["lr_scale"] == pytest.approx(0.5**4)
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5**2)
    assert by_name["head.classifier.weight"]["lr_scale"] == 1.0
    assert by_name["head.pyramid.levels.0.0.weight"]["lr_scale"] == 1.0


def test_blocks_after_the_deepest_index_are_dropped():
    model = Segmenter(tiny_backbone(depth=4), num_classes=2, kind="linear", indices=[1])
    assert len(model.backbone.blocks) == 2 and model.num_layers() == 2


# -------------------------------------------------------------------------------------------------- data
def test_labels_follow_the_ade20k_convention_when_reducing_zero(tmp_path):
    path = tmp_path / "label.png"
    Image.fromarray(np.array([[0, 1, 150], [255, 2, 3]], np.uint8), mode="L").save(path)
    assert load_label(path, 150, reduce_zero_label=True).tolist() == [[255, 0, 149], [255, 1, 2]]
    assert load_label(path, 151, reduce_zero_label=False).tolist() == [[0, 1, 150], [255, 2, 3]]
    with pytest.raises(ValueError, match="num_classes=100"):
        load_label(path, 100, reduce_zero_label=True)
    Image.new("RGB", (2, 2)).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="single-channel"):
        load_label(tmp_path / "colour.png", 150, reduce_zero_label=True)


def test_pairs_need_a_label_for_every_image(tmp_path):
    root = write_ade20k(tmp_path / "ade", train=2, val=1)
    assert [image.name for image, _ in ade20k_pairs(root, "training")] == ["training_000.jpg", "training_001.jpg"]
    (root / "annotations" / "training" / "training_001.png").unlink()
    with pytest.raises(FileNotFoundError, match="training_001.jpg needs training_001.png"):
        ade20k_pairs(root, "training")


def test_training_crops_move_image_and_label_together(dataset):
    cfg = SegDataConfig(root=str(dataset), num_classes=3, reduce_zero_label=False, crop_size=32,
                        train_scale=(128, 64), ratio_range=(0.5, 1.5), photometric=True)
    transform = SegTrainTransform(cfg)
    image = Image.open(dataset / "images" / "training" / "training_001.jpg").convert("RGB")
    label = load_label(dataset / "annotations" / "training" / "training_001.png", 3, False)
    for seed in range(8):
        tensor, target = transform(image, label, np.random.default_rng(seed))
        assert tensor.shape == (3, 32, 32) and target.shape == (32, 32) and target.dtype == torch.long
        assert set(target.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}  # nearest neighbour: no new values
    assert rescale_size(640, 480, (2048, 512)) == (683, 512) and rescale_size(100, 50, (96, 48), 2.0) == (192, 96)
    # Without photometric noise, the crop's colours still tell its labels: the geometry is shared.
    plain = SegTrainTransform(SegDataConfig(root=str(dataset), num_classes=3, reduce_zero_label=False, crop_size=32,
                                            train_scale=(96, 48), photometric=False, mean=(0, 0, 0), std=(1, 1, 1)))
    tensor, target = plain(image, label, np.random.default_rng(3))
    red = tensor[0] > tensor[2] + 0.3
    assert (target[red] == 1).float().mean() > 0.9


def test_the_training_loader_resumes_mid_epoch_with_the_same_crops(dataset):
    cfg = SegDataConfig(root=str(dataset), num_classes=3, reduce_zero_label=False, crop_size=32,
                        train_scale=(96, 48), num_workers=0)
    loader = build_seg_loader(cfg, "train", batch_size=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    resumed = build_seg_loader(cfg, "train", batch_size=2)
    iterator = iter(resumed)
    next(iterator)
    state = resumed.state_dict()
    again = build_seg_loader(cfg, "train", batch_size=2)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == 3
    for a, b in zip(rest, batches[1:]):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.crop_size=36"], "not divisible by patch_size"),
        (["head.kind=linear", "head.indices=[0, 1]"], "reads 1 blocks"),
        (["head.kind=fcn"], "head.kind must be one of"),
        (["freeze_backbone=true", "model.drop_path_rate=0.1"], "model.drop_path_rate=0"),
        (["eval.stride=40"], "eval.stride"),
        (["model.options={img_size: 48}"], "use data.crop_size"),
        (["distributed.strategy=fsdp"], "use ddp or zero1"),
    ],
)
def test_config_mistakes_are_caught_before_anything_is_built(dataset, tmp_path, extra, message):
    config = load_config(SegmentConfig, None, tiny_overrides(dataset, tmp_path, "linear", 1) + extra)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate(config)


# ------------------------------------------------------------------------------------------------- runs
def tiny_overrides(root: Path, output_dir: Path, kind: str, steps: int) -> list[str]:
    return [
        "model.name=eva_tiny_p16",
        "model.options={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        f"head.kind={kind}",
        "head.channels=16",
        f"data.root={root}",
        "data.num_classes=3",
        "data.reduce_zero_label=false",
        "data.crop_size=32",
        "data.train_scale=[96, 48]",
        "data.ratio_range=[0.75, 1.5]",
        "data.eval_scale=null",
        "data.num_workers=0",
        "data.pin_memory=false",
        "eval.stride=16",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
        "optim.layer_decay=0.9",
        f"loop.total_steps={steps}",
        "loop.eval_every=0",
        "loop.log_every=1",
        "loop.progress_bar=false",
        "loop.tensorboard=false",
        "checkpoint.every=1000",
        "model.drop_path_rate=0.1",
        "batch_size=4",
        "device=cpu",
        f"output_dir={output_dir}",
    ]


@pytest.mark.parametrize("kind", ["linear", "upernet"])
def test_segmentation_runs_end_to_end_through_the_cli(dataset, tmp_path, capsys, kind):
    torch.manual_seed(0)  # a "pre-trained" backbone at 16 px: its positions are resampled to the 32-px crop
    pretrained = evamim.save_pretrained(tiny_backbone(img_size=16, global_pool="token", mim_head_dim=8), tmp_path / "pt")
    output = tmp_path / "run"
    overrides = [o for o in tiny_overrides(dataset, output, kind, 6) if not o.startswith(("model.name", "model.options"))]
    assert main(["segment", *overrides, f"model.pretrained={pretrained}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split() == ["head", "steps", "mIoU", "mAcc", "aAcc"] and out[-1].split()[:2] == [kind, "6"]
    results = json.loads((output / "summary.json").read_text())
    assert results["steps"] == 6 and results["head"] == kind and 0.0 <= results["mIoU"] <= 100.0
    assert len(results["per_class_iou"]) == 3 and "NaN" in results["iou_convention"]
    assert (output / "config.yaml").exists()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [r["eval/mIoU"] for r in records if "eval/mIoU" in r] == [pytest.approx(results["mIoU"])]

    if kind == "linear":  # re-running the finished run trains nothing and evaluates the saved state again
        again = run_segmentation(load_config(SegmentConfig, None, overrides + [f"model.pretrained={pretrained}"]))
        assert again["steps"] == 6 and again["mIoU"] == pytest.approx(results["mIoU"])

    model = load_segmenter(output / "model")  # the exported model has the architecture the task builds
    assert model.kind == kind and model.backbone.pos_embed.shape == (1, 17, 32)
    built = build_segmenter(load_config(SegmentConfig, None, overrides + [f"model.pretrained={pretrained}"]))
    built.load_state_dict(model.state_dict())  # strict: the same parameter names and shapes


RECIPES = sorted((Path(__file__).parents[1] / "src/evamim/recipes/segment").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_and_validate_once_their_paths_are_given(recipe, tmp_path):
    backbone = evamim.create_model("eva_base_p16", device="meta")  # the architecture the B/16 recipes expect
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "config.json").write_text(json.dumps(backbone.config.to_dict()))
    with pytest.raises(ConfigError, match="model.pretrained /path/to/.* does not exist"):
        validate(load_config(SegmentConfig, recipe, ["data.root=/data/ade"]))
    with pytest.raises(ConfigError, match="data.root is empty"):
        validate(load_config(SegmentConfig, recipe, [f"model.pretrained={pretrained}"]))
    config = load_config(SegmentConfig, recipe, [f"model.pretrained={pretrained}", "data.root=/data/ade"])
    validate(config)
    assert config.optim.schedule == "poly" and config.data.num_classes == 150 and config.data.reduce_zero_label
