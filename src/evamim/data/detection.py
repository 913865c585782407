"""Detection and instance-segmentation data in the COCO format: annotations, large-scale jitter, the loader.

Layout: an image folder and one COCO JSON file (``DetDataConfig.images`` / ``annotations``), e.g. COCO 2017's
``train2017/`` and ``annotations/instances_train2017.json``, or what ``evamim data make-instances`` writes. The
JSON needs ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``id``, ``image_id``,
``category_id``, ``bbox`` [x, y, w, h] in pixels, ``segmentation`` as polygons or RLE, ``iscrowd``) and
``categories`` (``id``, ``name``). An LVIS file loads for training (its images are named by ``coco_url``: point
``images`` at the COCO image root holding ``train2017/`` and ``val2017/``); its evaluation, with frequency groups
and federated negatives, is not COCO's and is refused.

Conventions once loaded: categories are sorted by id and numbered 1..K (``labels``; 0 is the background);
``CocoAnnotations.category_ids[label - 1]`` maps back. Boxes are (x1, y1, x2, y2) float pixels, masks (N, h, w)
uint8. Crowd annotations (``iscrowd=1``) are not trained on (detectron2) and are scored as COCO scores them.

Training augmentation, ViTDet's large-scale jitter (LSJ): horizontal flip (p = ``hflip``), resize keeping the
aspect ratio to ``scale`` x ``img_size`` (``scale`` uniform in ``scale_range``, the image fit inside that square:
detectron2's ResizeScale), then a random ``img_size`` x ``img_size`` crop where the image is larger
(FixedSizeCrop, whose one uniform draw sets both offsets); the model pads what is smaller. Boxes are then
recomputed from the cropped masks and instances left with no pixel are dropped (detectron2's
``recompute_boxes``). Every sample's draws come from ``(seed, epoch, index)``, so a resumed run repeats them.

Evaluation images are returned as stored (the model resizes them, ``evamim.models.detector``), with their COCO
``image_id``. Loading goes through the shared resumable ``evamim.data.loader.Loader``: an unreadable image, or
one whose size differs from its JSON entry, is skipped, counted and judged by ``max_bad_fraction``; a JSON that
is malformed stops the run before training, naming the entry.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from evamim.data.config import DataConfig
from evamim.data.decode import BadSample, decode_image
from evamim.data.failures import BadSampleMonitor
from evamim.data.loader import Loader
from evamim.data.samples import AUGMENT_STREAM, sample_rng
from evamim.engine.batching import PerSample

MAX_IMAGE_PIXELS = 89_478_485
PYCOCOTOOLS_MISSING = ("COCO masks and evaluation need pycocotools, which is not installed: "
                       "pip install 'evamim[detect]' (or pip install pycocotools)")


def require_pycocotools() -> None:
    """Raise ImportError with the install command when pycocotools is missing."""
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        raise ImportError(PYCOCOTOOLS_MISSING) from None


@dataclass
class DetDataConfig:
    """Where the training images are and how they are augmented and loaded."""

    images: str = ""
    """Folder of the training images (``file_name`` in the JSON is relative to it)."""
    annotations: str = ""
    """The training COCO JSON file."""
    img_size: int = 1024
    """Side of the square the images are jittered, cropped and padded to: the backbone's input size."""
    scale_range: tuple[float, float] = (0.1, 2.0)
    """LSJ: the random resize factor of ``img_size`` (ViTDet / EVA: 0.1 to 2.0)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    filter_empty: bool = True
    """Skip training images without a (non-crowd) instance, as detectron2 does by default."""
    num_workers: int = 4
    """DataLoader worker processes (0 = load in the training process)."""
    pin_memory: bool = True
    shuffle: bool = True
    seed: int = 0
    """Seed of the epoch order and of every sample's augmentation."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Refuse images with more pixels than this (decompression-bomb guard, PIL's default)."""
    max_bad_fraction: float = DataConfig.max_bad_fraction
    """Stop with an error when more than this fraction of the recent samples failed to load."""
    bad_window: int = DataConfig.bad_window
    bad_min_samples: int = DataConfig.bad_min_samples

    def __post_init__(self) -> None:
        self.scale_range = tuple(float(v) for v in self.scale_range)
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Settings out of range, each naming its ``data.*`` key (paths are checked when loading)."""
        found = []
        if self.img_size < 16:
            found.append(f"data.img_size must be >= 16, got {self.img_size}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            found.append(f"data.scale_range must satisfy 0 < low <= high, got {list(self.scale_range)}")
        if not 0 <= self.hflip <= 1:
            found.append(f"data.hflip must be a probability, got {self.hflip}")
        if self.num_workers < 0:
            found.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            found.append(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        return found


# ------------------------------------------------------------------------------------------- annotations
class CocoAnnotations:
    """A COCO instances JSON, checked and indexed: ``images`` (list of dicts, file order), ``by_image``
    (image id -> its annotations), ``category_ids`` / ``category_names`` (label - 1 -> id / name).

    Every annotation is checked when the file is read, so that a malformed entry stops the run before training
    (not in a loader worker hours later): its image and category exist, its box is four numbers, and its
    ``segmentation`` is polygons (lists of an even number of coordinates) or an RLE of its image's size (the mask
    head trains on masks: box-only annotations are refused). ``for_evaluation`` also requires ``area`` and
    ``iscrowd``, which COCOeval reads.
    """

    def __init__(self, path: str | os.PathLike, for_evaluation: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"annotation file {self.path} does not exist")
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path} is not a JSON file: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: a COCO file is a JSON object with images, annotations and categories")
        missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
        if missing:
            raise ValueError(f"{self.path}: no {', '.join(missing)} list; a COCO instances file has images, "
                             "annotations and categories (a captions or panoptic file is not one)")
        self.categories = sorted(data["categories"], key=lambda c: self._field(c, "id", int, "categories"))
        self.category_ids = [int(c["id"]) for c in self.categories]
        self.category_names = [str(c.get("name", c["id"])) for c in self.categories]
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"{self.path}: category ids repeat: {self.category_ids}")
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.is_lvis = any("frequency" in c for c in self.categories) or any(
            "neg_category_ids" in image for image in data["images"])
        if for_evaluation and self.is_lvis:
            raise ValueError(f"{self.path} is an LVIS file: LVIS is scored with its own federated protocol (frequency "
                             "groups, verified negatives, 300 detections per image), which evamim does not implement; "
                             "COCOeval would give wrong numbers. Train on it with eval.enabled=false")
        self.images = []
        for image in data["images"]:
            if "file_name" not in image and isinstance(image.get("coco_url"), str):
                # LVIS names its images by their COCO URL: .../train2017/000000155379.jpg -> train2017/000000155379.jpg
                image = {**image, "file_name": "/".join(image["coco_url"].split("/")[-2:])}
            for key in ("id", "file_name", "width", "height"):
                self._field(image, key, str if key == "file_name" else int, "images")
            self.images.append(image)
        image_of = {int(image["id"]): image for image in self.images}
        if len(image_of) != len(self.images):
            raise ValueError(f"{self.path}: image ids repeat")
        self.by_image: dict[int, list[dict]] = {image_id: [] for image_id in image_of}
        for annotation in data["annotations"]:
            image_id = self._field(annotation, "image_id", int, "annotations")
            category = self._field(annotation, "category_id", int, "annotations")
            name = f"{self.path}: annotation {annotation.get('id')}"
            bbox = annotation.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise ValueError(f"{name} has bbox {bbox!r}; COCO boxes are [x, y, width, height] in pixels")
            if image_id not in image_of:
                raise ValueError(f"{name} is of image {image_id}, which is not in images")
            if category not in self.label_of:
                raise ValueError(f"{name} has category {category}, which is not in categories {self.category_ids}")
            _check_segmentation(annotation, image_of[image_id], name)
            if for_evaluation:
                for key in ("area", "iscrowd"):
                    if not _is_number(annotation.get(key)):
                        raise ValueError(f"{name} has no {key}: COCOeval needs area and iscrowd on every annotation "
                                         "of the validation file")
            self.by_image[image_id].append(annotation)

    def _field(self, entry: Any, key: str, kind: type, where: str):
        value = entry.get(key) if isinstance(entry, dict) else None
        if value is None:
            raise ValueError(f"{self.path}: an entry of {where} has no {key!r}: {str(entry)[:120]}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.path}: {where} entry {str(entry)[:120]} has {key}={value!r}") from None

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def trainable(self, image: dict) -> list[dict]:
        """The annotations of an image that are trained on: not crowd, a box of positive size."""
        return [a for a in self.by_image[int(image["id"])]
                if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_segmentation(annotation: dict, image: dict, name: str) -> None:
    """Raise ValueError (naming the annotation) unless its segmentation is polygons or an RLE of the image's size."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list) and segmentation:
        for polygon in segmentation:
            if not (isinstance(polygon, list) and all(_is_number(v) for v in polygon)) or len(polygon) % 2:
                raise ValueError(f"{name}: a polygon must be a list of x, y coordinates (an even count of numbers), "
                                 f"got {str(polygon)[:80]}")
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        size = [int(image["height"]), int(image["width"])]
        if list(segmentation.get("size", [])) != size:
            raise ValueError(f"{name}: its RLE is of size {segmentation.get('size')} but its image is {size} "
                             "(height, width)")
    else:
        raise ValueError(f"{name} has no usable segmentation ({str(segmentation)[:60]}): the mask head trains on "
                         "masks, as polygons or RLE; box-only annotations are not supported")


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """The (h, w) uint8 mask of a COCO annotation: polygons, uncompressed RLE or RLE (pycocotools)."""
    from pycocotools import mask as mask_utils

    segmentation = annotation.get("segmentation")
    if not segmentation:
        raise ValueError(f"annotation {annotation.get('id')} has no segmentation; masks are needed to train the mask "
                         "head")
    if isinstance(segmentation, list):  # polygons: one object may be several
        # A polygon needs 3 points; detectron2 drops shorter ones too. None left: an empty mask (dropped later).
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    mask = mask_utils.decode(rle).astype(np.uint8)
    if mask.shape != (height, width):
        raise ValueError(f"annotation {annotation.get('id')}: its RLE mask is {mask.shape[1]}x{mask.shape[0]} but the "
                         f"image is {width}x{height}")
    return mask


# -------------------------------------------------------------------------------------------- transforms
def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, h, w) masks -> (N, 4) tight (x1, y1, x2, y2) boxes in pixel edges; an empty mask gives a zero box."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.any(mask, axis=1).nonzero()[0], np.any(mask, axis=0).nonzero()[0]
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def large_scale_jitter(image: Image.Image, masks: np.ndarray, rng: np.random.Generator, size: int,
                       scale_range: tuple[float, float], hflip: float) -> tuple[Image.Image, np.ndarray]:
    """Flip, ResizeScale and FixedSizeCrop (see the module docstring) of an image and its (N, h, w) masks.

    The image is resized bilinearly (PIL) then cropped; each mask is read at the crop's pixels only, by nearest
    neighbour (pixel centres mapped back: row ``y`` of the resized image reads row ``floor((y + 0.5) h / h')``),
    so that a mask never exists at the resized size (at scale 2 of a 1280 square that would be ~5 MB each)."""
    if rng.random() < hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        masks = masks[:, :, ::-1]
    width, height = image.size
    target = size * rng.uniform(*scale_range)
    scale = min(target / height, target / width)
    new_width, new_height = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    image = image.resize((new_width, new_height), Image.BILINEAR)
    # One draw for both offsets, as detectron2's FixedSizeCrop (offset = max_offset * u): the crop window slides
    # along the diagonal of the possible offsets.
    position = rng.uniform(0.0, 1.0)
    top = int(round(max(new_height - size, 0) * position))
    left = int(round(max(new_width - size, 0) * position))
    crop_height, crop_width = min(size, new_height), min(size, new_width)
    if (crop_height, crop_width) != (new_height, new_width):
        image = image.crop((left, top, left + crop_width, top + crop_height))
    rows = np.minimum(((top + np.arange(crop_height) + 0.5) * height / new_height).astype(np.int64), height - 1)
    cols = np.minimum(((left + np.arange(crop_width) + 0.5) * width / new_width).astype(np.int64), width - 1)
    return image, np.ascontiguousarray(masks[:, rows][:, :, cols])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, h, w) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


# --------------------------------------------------------------------------------------------- datasets
class CocoInstances(Dataset):
    """``dataset[(epoch, index)]`` -> a training sample ``{"image": (3, h, w) float in [0, 1], "target": {"boxes",
    "labels", "masks"}, "index", "image_id"}`` (``train=True``), or an evaluation sample ``{"image", "index",
    "image_id"}``. An image that cannot be used comes back as ``{"bad": ["path: reason"]}`` (skipped, counted)."""

    def __init__(self, annotations: CocoAnnotations, images_dir: str | os.PathLike, cfg: DetDataConfig, *,
                 train: bool, limit: int | None = None):
        self.annotations = annotations
        self.images_dir = Path(images_dir)
        self.cfg = cfg
        self.train = train
        entries = annotations.images
        if train and cfg.filter_empty:
            entries = [image for image in entries if annotations.trainable(image)]
        self.entries = entries[:limit]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        entry = self.entries[index]
        path = self.images_dir / entry["file_name"]
        try:
            image = decode_image(path, max_pixels=self.cfg.max_image_pixels)
        except BadSample as error:
            return {"bad": [f"{path}: {error.reason}"]}
        if image.size != (int(entry["width"]), int(entry["height"])):
            return {"bad": [f"{path}: the image is {image.size[0]}x{image.size[1]} but its JSON entry says "
                            f"{entry['width']}x{entry['height']}"]}
        sample = {"index": index, "image_id": int(entry["id"])}
        if not self.train:
            return {**sample, "image": to_tensor(image)}
        found = self.annotations.trainable(entry)
        masks = np.stack([annotation_mask(a, image.height, image.width) for a in found]) if found else \
            np.zeros((0, image.height, image.width), dtype=np.uint8)
        labels = np.array([self.annotations.label_of[int(a["category_id"])] for a in found], dtype=np.int64)
        rng = sample_rng((self.cfg.seed, epoch, index), AUGMENT_STREAM)
        image, masks = large_scale_jitter(image, masks, rng, self.cfg.img_size, self.cfg.scale_range, self.cfg.hflip)
        keep = masks.reshape(len(masks), -1).any(axis=1)
        masks, labels = masks[keep], labels[keep]
        target = {"boxes": torch.from_numpy(boxes_from_masks(masks)), "labels": torch.from_numpy(labels),
                  "masks": torch.from_numpy(masks)}
        return {**sample, "image": to_tensor(image), "target": target}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Images (of different sizes) and targets as per-sample lists: ``{"images", "targets"?, "image_ids",
    "indices"}`` (``PerSample``: micro-batching splits them by sample)."""
    batch = {"images": PerSample(s["image"] for s in samples), "image_ids": [s["image_id"] for s in samples],
             "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long)}
    if samples and "target" in samples[0]:
        batch["targets"] = PerSample(s["target"] for s in samples)
    return batch


def build_det_loader(cfg: DetDataConfig, purpose: str, batch_size: int = 1, *, images: str | None = None,
                     annotations: CocoAnnotations | None = None, limit: int | None = None, rank: int = 0,
                     world_size: int = 1) -> Loader:
    """The training loader (``purpose='train'``: shuffled, jittered, full batches) or the evaluation loader
    (``'eval'``: file order, as stored, no padding of ranks: each image is scored once over all processes).

    ``images`` / ``annotations`` default to ``cfg``'s (the validation set passes its own); ``limit``: the first
    that many images. Both are the resumable ``Loader`` (``state_dict`` / ``load_state_dict``,
    ``bad_sample_totals``).
    """
    require_pycocotools()
    annotations = annotations or CocoAnnotations(cfg.annotations)
    images_dir = Path(images or cfg.images)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} does not exist")
    if purpose == "train":
        dataset = CocoInstances(annotations, images_dir, cfg, train=True, limit=limit)
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"{len(dataset)} training images with instances cannot fill one batch of {batch_size} "
                             f"per process ({annotations.path})")
        options = dict(shuffle=cfg.shuffle, drop_last=True, pad=True)
    elif purpose == "eval":
        dataset = CocoInstances(annotations, images_dir, cfg, train=False, limit=limit)
        options = dict(shuffle=False, drop_last=False, pad=False)
    else:
        raise ValueError(f"unknown purpose {purpose!r}; expected 'train' or 'eval'")
    return Loader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        monitor=BadSampleMonitor(cfg.max_bad_fraction, cfg.bad_window, cfg.bad_min_samples),
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=True,
        **options,
    )


__all__ = [
    "CocoAnnotations",
    "CocoInstances",
    "DetDataConfig",
    "annotation_mask",
    "boxes_from_masks",
    "build_det_loader",
    "collate",
    "large_scale_jitter",
    "require_pycocotools",
]
