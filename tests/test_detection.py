"""`evamim detect`: COCO data and synthetic instances, large-scale jitter, COCOeval, the detector, the config, and a
tiny detector that learns."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evamim.cli import main
from evamim.config import ConfigError, load_config
from evamim.data.detection import (
    CocoAnnotations,
    DetDataConfig,
    annotation_mask,
    boxes_from_masks,
    build_det_loader,
    large_scale_jitter,
)
from evamim.data.instances import SyntheticInstances, write_instances
from evamim.engine import param_groups
from evamim.models.checkpoint import save_pretrained
from evamim.models.detector import Detector, DetectorHeadConfig, load_detector
from evamim.models.vit import EvaViT, EvaViTConfig
from evamim.tasks.det_metrics import DetectionEvaluation, coco_evaluate, detections_to_coco, load_ground_truth
from evamim.tasks.detection import DetectConfig, build_detector, run_detection, validate

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

TINY_VIT = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3)
TINY_HEAD = DetectorHeadConfig(channels=64, anchor_sizes=(8, 16, 32, 64, 128), box_convs=2, box_fc_dim=256,
                               mask_convs=2, rpn_pre_nms_top_n=(500, 300), rpn_post_nms_top_n=(200, 100),
                               rois_per_image=64)


def write_dataset(root: Path, train: int = 24, val: int = 9) -> Path:
    """Synthetic instances at 64 px, 1-4 objects of radius 8-14 px per image."""
    write_instances(root, train=train, val=val, resolution=64, max_objects=4, radius_range=(0.12, 0.22))
    return root


def tiny_overrides(root: Path, output_dir: Path, steps: int, *extra: str) -> list[str]:
    """A 4-block ViT (8-px patches, 64 px: an 8x8 grid cut into 4x4 windows, blocks 1 and 3 global) and narrow
    Mask R-CNN heads; anchors sized for 8-30 px objects."""
    head = TINY_HEAD
    return [
        "model.name=eva_tiny_p16", "model.options={patch_size: 8, embed_dim: 96, depth: 4, num_heads: 3}",
        "model.drop_path_rate=0.0", "model.window_size=4", "model.global_blocks=[1, 3]",
        f"head.channels={head.channels}", f"head.anchor_sizes={list(head.anchor_sizes)}",
        f"head.box_convs={head.box_convs}", f"head.box_fc_dim={head.box_fc_dim}", f"head.mask_convs={head.mask_convs}",
        f"head.rpn_pre_nms_top_n={list(head.rpn_pre_nms_top_n)}",
        f"head.rpn_post_nms_top_n={list(head.rpn_post_nms_top_n)}", f"head.rois_per_image={head.rois_per_image}",
        f"data.images={root}/images/train", f"data.annotations={root}/annotations/instances_train.json",
        "data.img_size=64", "data.scale_range=[0.8, 1.25]", "data.num_workers=0",
        f"val_data.images={root}/images/val", f"val_data.annotations={root}/annotations/instances_val.json",
        "optim.lr=1e-3", "optim.schedule=step", f"optim.milestones=[{max(steps * 9 // 10, 1)}]",
        f"optim.warmup_steps={max(steps // 10, 0)}", "optim.layer_decay=null",
        f"loop.total_steps={steps}", f"loop.eval_every={steps}", "loop.log_every=10", "loop.tensorboard=false",
        "batch_size=8", "global_batch_size=null", f"checkpoint.every={steps}",
        f"output_dir={output_dir}", "device=cpu", *extra,
    ]


# ------------------------------------------------------------------------------------ synthetic instances
def test_make_instances_writes_coco_whose_boxes_and_areas_are_the_masks(tmp_path, capsys):
    out = tmp_path / "instances"
    assert main(["data", "make-instances", str(out), "--train", "6", "--val", "3", "--resolution", "48"]) == 0
    assert "train: 6 images" in capsys.readouterr().out
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]][:3] == ["circle", "square", "triangle"]
    assert len(data["images"]) == 6 and data["annotations"]
    for annotation in data["annotations"]:
        mask = mask_utils.decode(annotation["segmentation"])
        assert mask.shape == (48, 48)
        assert annotation["area"] == int(mask.sum())
        x1, y1, x2, y2 = boxes_from_masks(mask[None])[0].tolist()
        assert annotation["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    image = data["images"][0]
    from PIL import Image

    assert Image.open(out / "images" / "train" / image["file_name"]).size == (48, 48)
    # The val split is other images (seed + 1), and an existing dataset is not overwritten silently.
    val = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert len(val["images"]) == 3
    assert main(["data", "make-instances", str(out), "--train", "2"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["data", "make-instances", str(tmp_path / "other"), "--min-radius", "0.6"]) == 2
    assert "--min-radius 0.6 and --max-radius 0.18 must satisfy" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert main(["data", "make-instances", str(out), "--train", "2", "--val", "0", "--overwrite"]) == 0
    assert not (out / "annotations" / "instances_val.json").exists() and not (out / "images" / "val").exists()
    assert len(list((out / "images" / "train").iterdir())) == 2


def test_synthetic_instances_are_reproducible_and_never_touch():
    source = SyntheticInstances(40, resolution=64, seed=3, max_objects=6)
    for index in range(40):
        background, instances = source.plan(index)
        assert source.plan(index) == (background, instances)
        for i, a in enumerate(instances):
            for b in instances[i + 1:]:
                assert np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) > a.radius + b.radius
    image, marks, instances = source.draw(7)
    assert sorted(np.unique(np.asarray(marks)).tolist()) == list(range(len(instances) + 1))


# ---------------------------------------------------------------------------------------- COCO files
def _coco(images=None, annotations=None, categories=None) -> dict:
    return {"images": images if images is not None else [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": annotations if annotations is not None else [],
            "categories": categories if categories is not None else [{"id": 3, "name": "thing"}]}


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a JSON file"),
    (json.dumps({"images": [], "annotations": []}), "no categories list"),
    (json.dumps(_coco(annotations=[{"id": 1, "image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1]}])),
     "is of image 9, which is not in images"),
    (json.dumps(_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}])),
     r"has category 4, which is not in categories \[3\]"),
    (json.dumps(_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1]}])),
     r"COCO boxes are \[x, y, width, height\]"),
    (json.dumps(_coco(images=[{"id": 1, "file_name": "a.png", "width": 8}])), "has no 'height'"),
    (json.dumps(_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": ["0", 0, 1, 1]}])),
     r"annotation 1 has bbox \['0', 0, 1, 1\]"),
    (json.dumps(_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}])),
     "annotation 1 has no usable segmentation .* box-only annotations are not supported"),
    (json.dumps(_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1],
                                    "segmentation": [[0, 0, 4, 0, 4]]}])), "an even count of numbers"),
    (json.dumps(_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1],
                                    "segmentation": {"size": [4, 4], "counts": "00"}}])),
     r"its RLE is of size \[4, 4\] but its image is \[8, 8\]"),
])
def test_malformed_coco_files_are_refused_naming_the_entry(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        CocoAnnotations(path)


def test_an_lvis_file_loads_for_training_and_is_refused_for_cocoeval(tmp_path):
    """LVIS names images by COCO URL and is scored with its federated protocol, not COCOeval's."""
    data = _coco(images=[{"id": 1, "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
                          "width": 8, "height": 8, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
                 categories=[{"id": 3, "name": "thing", "frequency": "r"}])
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(data))
    assert CocoAnnotations(path).images[0]["file_name"] == "val2017/000000000139.jpg"
    with pytest.raises(ValueError, match="is an LVIS file: LVIS is scored with its own federated protocol"):
        CocoAnnotations(path, for_evaluation=True)


def test_a_validation_file_needs_what_cocoeval_reads(tmp_path):
    """area and iscrowd: optional for training (iscrowd defaults to 0), required by COCOeval."""
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4],
                                                   "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}])))
    assert CocoAnnotations(path).trainable(CocoAnnotations(path).images[0])
    with pytest.raises(ValueError, match="annotation 1 has no area: COCOeval needs area and iscrowd"):
        CocoAnnotations(path, for_evaluation=True)


def test_polygons_and_rle_decode_to_the_same_mask():
    square = np.zeros((10, 12), np.uint8)
    square[2:6, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    rle["counts"] = rle["counts"].decode("ascii")
    polygon = {"segmentation": [[3, 2, 9, 2, 9, 6, 3, 6]]}
    assert np.array_equal(annotation_mask({"segmentation": rle}, 10, 12), square)
    assert np.array_equal(annotation_mask(polygon, 10, 12), square)
    # A two-point "polygon" cannot be drawn (detectron2 drops it too): an empty mask, dropped later.
    assert annotation_mask({"segmentation": [[1, 1, 4, 4]]}, 10, 12).sum() == 0
    with pytest.raises(ValueError, match="its RLE mask is 12x10 but the image is 20x20"):
        annotation_mask({"id": 5, "segmentation": rle}, 20, 20)


def test_large_scale_jitter_resizes_crops_and_flips_images_with_their_masks():
    image_array = np.zeros((40, 60, 3), np.uint8)
    image_array[:, :30] = 255  # left half white
    from PIL import Image

    image = Image.fromarray(image_array)
    masks = np.zeros((1, 40, 60), np.uint8)
    masks[0, 10:20, 5:15] = 1  # inside the white half
    rng = np.random.default_rng(0)
    # scale 2 of a 64 square: 60 px wide -> 128, cropped to 64 x 64
    big, big_masks = large_scale_jitter(image, masks, rng, 64, (2.0, 2.0), hflip=0.0)
    assert big.size == (64, 64) and big_masks.shape == (1, 64, 64)
    # scale 0.5: the longer side becomes 32, nothing is cropped, the mask follows the pixels
    small, small_masks = large_scale_jitter(image, masks, rng, 64, (0.5, 0.5), hflip=0.0)
    assert small.size == (32, 21) and small_masks.shape == (1, 21, 32)
    flipped, flipped_masks = large_scale_jitter(image, masks, rng, 64, (0.5, 0.5), hflip=1.0)
    pixels = np.asarray(flipped)
    assert pixels[:, -2].min() == 255 and pixels[:, 1].max() == 0  # white moved to the right
    x1, _, x2, _ = boxes_from_masks(flipped_masks)[0]
    assert x1 > 16 and x2 <= 32  # the mask moved with it


def test_training_samples_have_boxes_that_bound_their_masks(tmp_path):
    root = write_dataset(tmp_path / "inst", train=8, val=1)
    cfg = DetDataConfig(images=str(root / "images/train"), annotations=str(root / "annotations/instances_train.json"),
                        img_size=48, scale_range=(0.5, 2.0), num_workers=0)
    loader = build_det_loader(cfg, "train", 4)
    batch = next(iter(loader))
    assert len(batch["images"]) == 4
    for image, target in zip(batch["images"], batch["targets"]):
        assert image.shape[0] == 3 and max(image.shape[1:]) <= 48 and 0 <= image.min() and image.max() <= 1
        masks = target["masks"].numpy()
        assert masks.shape[1:] == image.shape[1:]
        assert torch.equal(target["boxes"], torch.from_numpy(boxes_from_masks(masks)))
        assert masks.reshape(len(masks), -1).any(axis=1).all()  # no empty instance is kept
        assert target["labels"].min() >= 1 and target["labels"].max() <= 8
    # The same (epoch, index) gives the same sample: resumable.
    again = loader.dataset[(0, int(batch["indices"][0]))]
    assert torch.equal(again["image"], batch["images"][0])


# --------------------------------------------------------------------------------------------- COCOeval
def _ground_truth_file(tmp_path: Path) -> Path:
    """One 100x100 image, two 40x40 objects of category 7 (medium), categories 3 and 7 (non-contiguous ids)."""
    def square(x, y):
        mask = np.zeros((100, 100), np.uint8)
        mask[y : y + 40, x : x + 40] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"bbox": [x, y, 40, 40], "area": 1600, "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}

    data = _coco(images=[{"id": 5, "file_name": "a.png", "width": 100, "height": 100}],
                 annotations=[{"id": 1, "image_id": 5, "category_id": 7, **square(0, 0)},
                              {"id": 2, "image_id": 5, "category_id": 7, **square(50, 50)}],
                 categories=[{"id": 3, "name": "other"}, {"id": 7, "name": "thing"}])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_evaluation_of_a_hand_made_case_gives_its_known_ap(tmp_path):
    """One of two objects found exactly (score 0.9) and one false positive (0.8): recall stops at 0.5 with
    precision 1 up to it, so AP = 51 / 101 recall points = 50.495% at every IoU threshold, boxes and masks."""
    path = _ground_truth_file(tmp_path)
    masks = torch.zeros(2, 1, 100, 100)
    masks[0, 0, 0:40, 0:40] = 1.0  # the first object, exactly
    masks[1, 0, 60:70, 0:10] = 1.0  # nothing there
    detections = {"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 60.0, 10.0, 70.0]]),
                  "labels": torch.tensor([2, 2]),  # label 2 = the second category by id: 7
                  "scores": torch.tensor([0.9, 0.8]), "masks": masks}
    records = detections_to_coco(detections, 5, [3, 7])
    assert [r["category_id"] for r in records] == [7, 7] and records[0]["bbox"] == [0.0, 0.0, 40.0, 40.0]
    metrics = coco_evaluate(str(path), records, [5])
    expected = 100 * 51 / 101
    for kind in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APm"):
            assert metrics[f"{kind}_{name}"] == pytest.approx(expected), (kind, name)
        assert f"{kind}_APs" not in metrics and f"{kind}_APl" not in metrics  # no such objects: not measurable
    # No detection at all: 0 where objects exist, and still nothing for the empty size ranges.
    empty = coco_evaluate(str(path), [], [5])
    assert empty == {f"{kind}_{name}": 0.0 for kind in ("bbox", "segm") for name in ("AP", "AP50", "AP75", "APm")}


def test_mask_ap_sorts_unmatched_masks_by_mask_area_not_box_area(tmp_path):
    """A wrong 10x10 mask with a 50x50 box is a false positive among the small objects (detectron2 scores it so):
    segm APs 50, while the boxes' APs stays 100 (the large box is a medium false positive)."""
    mask = np.zeros((100, 100), np.uint8)
    mask[0:10, 0:10] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    data = _coco(images=[{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
                 annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100,
                               "iscrowd": 0, "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()}}])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    masks = torch.zeros(2, 1, 100, 100)
    masks[0, 0, 0:10, 0:10] = 1
    masks[1, 0, 50:60, 50:60] = 1
    detections = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 90.0, 90.0]]),
                  "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.9, 0.95]), "masks": masks}
    metrics = coco_evaluate(str(path), detections_to_coco(detections, 1, [3]), [1])
    assert metrics["segm_APs"] == pytest.approx(50.0) and metrics["bbox_APs"] == pytest.approx(100.0)


def test_images_the_loader_could_not_read_are_left_out_of_the_score_and_said(tmp_path, caplog):
    path = _ground_truth_file(tmp_path)
    loader = type("Loader", (), {"dataset": type("Dataset", (), {"entries": [{"id": 5}, {"id": 6}]})()})()
    annotations = type("Annotations", (), {"category_ids": [3, 7], "path": path})()
    evaluation = DetectionEvaluation(loader, torch.device("cpu"), annotations, with_masks=False)
    record = {"image_id": 5, "category_id": 7, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.9}
    metrics = evaluation.finalize([record, {"scored_image": 5}])  # image 6 never came out of the loader
    assert metrics["images"] == 1 and metrics["detections"] == 1
    assert "1 of 2 validation images could not be read" in caplog.text
    with pytest.raises(RuntimeError, match="no validation image could be read"):
        evaluation.finalize([])


# --------------------------------------------------------------------------------------------- the model
def test_detector_loads_a_global_attention_checkpoint_with_every_weight(tmp_path):
    """The pre-trained evamim model (global attention, cls token) loads strictly into the windowed backbone: every
    tensor of the file lands in the detector unchanged (the cls token is kept, though ViTDet reads no cls token)."""
    torch.manual_seed(0)
    vit = EvaViT(EvaViTConfig(img_size=64, **TINY_VIT))
    save_pretrained(vit, tmp_path / "pretrained")
    root = write_dataset(tmp_path / "inst", train=4, val=1)
    config = load_config(DetectConfig, None, tiny_overrides(root, tmp_path / "run", 2) +
                         ["model.name=null", "model.options={}", f"model.pretrained={tmp_path / 'pretrained'}"])
    detector = build_detector(config, 8)
    assert detector.vit.config.window_size == 4 and detector.vit.config.global_blocks == (1, 3)
    file_state = vit.state_dict()
    loaded = {name[len("model.backbone.vit."):]: tensor for name, tensor in detector.state_dict().items()
              if name.startswith("model.backbone.vit.")}
    backbone_keys = {k for k in file_state if not k.startswith(("head.", "norm.", "fc_norm.", "lm_head."))}
    assert set(loaded) == backbone_keys
    for name in backbone_keys:
        assert torch.equal(loaded[name], file_state[name]), name


def test_detector_contract_sizes_and_layer_decay():
    torch.manual_seed(0)
    detector = Detector(EvaViT(EvaViTConfig(img_size=64, window_size=4, global_blocks=(3,), **TINY_VIT)), 8, TINY_HEAD)
    detector.eval()
    with torch.no_grad():
        (output,) = detector([torch.rand(3, 90, 120)])  # larger than 64: resized to a longer side of 64
    assert output["masks"].shape[1:] == (1, 90, 120)
    assert output["boxes"].shape[1] == 4 and (output["boxes"][:, 2] <= 120).all() and (output["boxes"][:, 3] <= 90).all()
    detector.train()
    target = {"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 70, 70, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="a 70x70 image does not fit the detector's 64x64 input"):
        detector([torch.rand(3, 70, 70)], [target])
    # Layer-wise lr decay as detectron2's get_vit_lr_decay_rate: embeddings 0, block i -> i + 1, the rest L + 1.
    assert detector.layer_id("model.backbone.vit.pos_embed") == 0
    assert detector.layer_id("model.backbone.vit.blocks.2.attn.qkv.weight") == 3
    assert detector.layer_id("model.backbone.pyramid.levels.0.0.weight") == 5
    assert detector.layer_id("model.roi_heads.mask_predictor.mask_fcn_logits.weight") == 5
    groups = param_groups(detector, 0.1, layer_decay=0.5)
    scales = {group["layer_id"]: group["lr_scale"] for group in groups}
    assert scales[5] == 1.0 and scales[0] == pytest.approx(0.5**5)
    frozen = {name for name, p in detector.named_parameters() if not p.requires_grad}
    assert frozen == {"model.backbone.vit.cls_token"}  # read by no forward: DDP would find it unused
    with pytest.raises(ValueError, match="patch size must be a power of two >= 4, got 12"):
        Detector(EvaViT(EvaViTConfig(img_size=48, patch_size=12, embed_dim=32, depth=1, num_heads=2)), 2, TINY_HEAD)


def test_roi_levels_do_not_depend_on_the_first_batch():
    """torchvision's poolers guess their scales on their first call from the unpadded image sizes; the detector
    sets them from the pyramid. A small landscape image first must not change what a later image gives."""
    torch.manual_seed(0)
    vit = EvaViT(EvaViTConfig(img_size=64, window_size=4, global_blocks=(3,), **TINY_VIT))
    head = DetectorHeadConfig(**{**TINY_HEAD.__dict__, "score_threshold": 0.0})
    first = Detector(vit, 8, head).eval()
    fresh = Detector(EvaViT(EvaViTConfig(img_size=64, window_size=4, global_blocks=(3,), **TINY_VIT)), 8, head).eval()
    fresh.load_state_dict(first.state_dict())
    assert first.model.roi_heads.box_roi_pool.scales == [0.5, 0.25, 0.125, 0.0625]  # strides 2, 4, 8, 16 (p = 8)
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        first([torch.rand(3, 20, 40)])  # 40 px wide: scaled to 64 x 32, a quarter of the padded square
        a, b = first([image])[0], fresh([image])[0]
    assert first.model.roi_heads.mask_roi_pool.scales == [0.5, 0.25, 0.125, 0.0625]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


def test_detect_config_mistakes_are_refused_with_the_fix(tmp_path):
    root = write_dataset(tmp_path / "inst", train=2, val=1)
    base = tiny_overrides(root, tmp_path / "run", 10)

    def problems(*extra: str) -> str:
        with pytest.raises(ConfigError) as error:
            validate(load_config(DetectConfig, None, base + list(extra)))
        return str(error.value)

    assert "data.images /nowhere is not a folder" in problems("data.images=/nowhere")
    assert "val_data.annotations is empty" in problems("val_data.annotations=null")
    assert "not a multiple of window_size 3" in problems("model.window_size=3")
    assert "only apply with window attention" in problems("model.window_size=0")
    assert "model.options.window_size is set by this task: use model.window_size" in problems(
        "model.options={window_size: 4}")
    assert "distributed.strategy=fsdp is not available for detect" in problems("distributed.strategy=fsdp")
    assert "so the patch size must be a power of two >= 4, got 12" in problems(
        "model.options={patch_size: 12, embed_dim: 96, depth: 4, num_heads: 3}", "data.img_size=48")
    assert "optim.milestones [10] are not before the end of the run" in problems("optim.milestones=[10]")
    with pytest.raises(ConfigError, match="head.anchor_size"):
        load_config(DetectConfig, None, base + ["head.anchor_size=[1]"])
    validate(load_config(DetectConfig, None, base))  # the tiny config itself is fine


def test_detect_cli_refuses_a_missing_annotation_file_in_one_line(tmp_path, capsys):
    root = write_dataset(tmp_path / "inst", train=2, val=1)
    code = main(["detect", *tiny_overrides(root, tmp_path / "run", 2), f"data.annotations={tmp_path}/none.json"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"data.annotations {tmp_path}/none.json does not exist" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ it learns
@pytest.mark.slow  # 200 training steps of a tiny Mask R-CNN and two evaluations: ~2.5 min on 2 cores
def test_tiny_detector_learns_the_synthetic_instances(tmp_path, capsys):
    """From random init on 200 synthetic images: box AP50 far above the untrained detector's (which is ~0), and a
    mask AP from pycocotools; the exported detector reloads and scores the same."""
    root = write_dataset(tmp_path / "inst", train=200, val=50)
    output_dir = tmp_path / "run"
    assert main(["detect", *tiny_overrides(root, output_dir, 200)]) == 0
    assert "bbox_AP50" in capsys.readouterr().out
    results = json.loads((output_dir / "summary.json").read_text())
    assert results["bbox_AP50"] > 60, results
    assert results["segm_AP50"] > 40 and results["segm_AP"] > 10, results
    assert results["category_names"][:2] == ["circle", "square"]

    config = load_config(DetectConfig, None, tiny_overrides(root, output_dir, 200))
    annotations = CocoAnnotations(config.val_data.annotations)
    loader = build_det_loader(config.data, "eval", 4, images=config.val_data.images, annotations=annotations)
    evaluation = DetectionEvaluation(loader, torch.device("cpu"), annotations)
    untrained = build_detector(config, annotations.num_classes).eval()
    with torch.no_grad():
        chance = evaluation(untrained)
    assert chance["bbox_AP50"] < 5, chance
    detector, description = load_detector(output_dir / "model")
    assert description["category_ids"] == annotations.category_ids
    with torch.no_grad():
        reloaded = evaluation(detector.eval())
    assert reloaded["bbox_AP50"] == pytest.approx(results["bbox_AP50"], abs=1e-6)
    print(f"box AP50 {results['bbox_AP50']:.1f} (untrained {chance['bbox_AP50']:.1f}), mask AP "
          f"{results['segm_AP']:.1f}")


def test_ground_truth_loader_is_quiet(tmp_path, capsys):
    """pycocotools prints its progress; evamim keeps it out of the console."""
    load_ground_truth(str(_ground_truth_file(tmp_path)))
    assert capsys.readouterr().out == ""


@pytest.mark.slow  # two short runs of the tiny detector: ~20 s on 2 cores
def test_a_killed_detection_run_resumes_exactly(tmp_path):
    """8 steps straight vs. a run that checkpoints at step 4, dies at step 6 and is re-run: the same losses and
    the same weights (the jitter is drawn per sample; the RPN / RoI sampling from the checkpointed RNG)."""
    from safetensors.torch import load_file

    from test_pretrain import CrashAtStep

    root = write_dataset(tmp_path / "inst", train=16, val=2)
    options = ("eval.enabled=false", "loop.log_every=1")
    straight = load_config(DetectConfig, None, tiny_overrides(root, tmp_path / "straight", 8, *options))
    run_detection(straight)
    crashed = load_config(DetectConfig, None, tiny_overrides(root, tmp_path / "resumed", 8, *options,
                                                             "checkpoint.every=4"))
    with pytest.raises(KeyboardInterrupt):
        run_detection(crashed, hooks=(CrashAtStep(6),))
    run_detection(crashed)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    assert len(losses("straight")) == 8 and losses("resumed") == losses("straight")
    a, b = (load_file(str(tmp_path / run / "model" / "detector.safetensors")) for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
