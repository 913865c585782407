"""Mask R-CNN on a plain EVA ViT, ViTDet-style: window-attention backbone -> simple feature pyramid ->
torchvision's RPN, RoI box head and mask head.

Conventions:
- Inputs are a list of (3, h, w) float images in [0, 1] (RGB, not normalised); the model normalises them
  (CLIP mean/std by default) and pads every image, at the bottom/right with zeros after normalisation (the mean
  colour), to the square ``img_size`` the backbone is built for (ViTDet's ``square_pad``). Training images must
  already fit in it (large-scale jitter crops them, ``evamim.data.detection``); at evaluation each image is
  resized so that its longer side is ``img_size`` (detectron2's ResizeShortestEdge(short=max=size)), and the
  boxes and masks come back in the input image's coordinates.
- Targets (training): per image ``boxes`` (N, 4) float (x1, y1, x2, y2) in pixels, ``labels`` (N,) int64 in
  1..K (0 is the background), ``masks`` (N, h, w) uint8.
- Outputs (evaluation): per image ``boxes``, ``labels``, ``scores`` and ``masks`` (N, 1, h, w) float
  probabilities pasted at the input size. Training returns torchvision's loss dict (``loss_objectness``,
  ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``, ``loss_mask``).

Feature maps: the last block's output (stride p) -> the ``vitdet`` pyramid (``evamim.models.pyramid``) at
strides p/4, p/2, p, 2p with ``channels`` channels, plus a stride-4p max-pooled level ("pool", detectron2's
LastLevelMaxPool) for the RPN. ViTDet's heads: RPN with two 3x3 convs; box head of four 3x3 convs + LayerNorm
and one fc; mask head of four 3x3 convs + LayerNorm, a deconvolution and a per-class 1x1 predictor.
Not here: Cascade R-CNN's three box stages (torchvision has none), and relative position biases in attention
(EVA-01's detection backbone learns them from zero; EVA-02's, with RoPE, has none).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evamim import atomic
from evamim.data.config import CLIP_MEAN, CLIP_STD
from evamim.models.pyramid import LayerNorm2d, SimpleFeaturePyramid
from evamim.models.vit import EvaViT, EvaViTConfig


@dataclass
class DetectorHeadConfig:
    """The parts of the detector besides the ViT (ViTDet's Mask R-CNN defaults)."""

    channels: int = 256
    """Width of the feature pyramid, the RPN and the RoI heads' convolutions."""
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    """One anchor size per pyramid level (strides p/4 .. 4p), in input pixels; three aspect ratios each."""
    box_convs: int = 4
    """3x3 conv + LayerNorm layers of the RoI box head before its fc."""
    box_fc_dim: int = 1024
    mask_convs: int = 4
    """3x3 conv + LayerNorm layers of the mask head."""
    rpn_convs: int = 2
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000)
    """Proposals kept per pyramid level before the RPN's NMS (training, evaluation)."""
    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000)
    """Proposals kept per image after it (training, evaluation)."""
    rois_per_image: int = 512
    """Sampled RoIs per training image, 25% foreground."""
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        self.rpn_pre_nms_top_n = tuple(int(n) for n in self.rpn_pre_nms_top_n)
        self.rpn_post_nms_top_n = tuple(int(n) for n in self.rpn_post_nms_top_n)
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)

    def problems(self) -> list[str]:
        """What is out of range, each naming its ``head.*`` key."""
        found = []
        if self.channels < 1:
            found.append(f"head.channels must be >= 1, got {self.channels}")
        if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) < 1:
            found.append(f"head.anchor_sizes needs 5 positive sizes (one per pyramid level), got "
                         f"{list(self.anchor_sizes)}")
        if self.box_convs < 0:
            found.append(f"head.box_convs must be >= 0, got {self.box_convs}")
        for name in ("box_fc_dim", "mask_convs", "rpn_convs", "rois_per_image", "detections_per_image"):
            if getattr(self, name) < 1:
                found.append(f"head.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                found.append(f"head.{name} needs two positive counts (training, evaluation), got {list(value)}")
        for name in ("score_threshold", "nms_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"head.{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            found.append(f"head.mean and head.std need 3 values, std > 0; got {self.mean}, {self.std}")
        return found


class ViTDetBackbone(nn.Module):
    """EvaViT (usually windowed) + the vitdet simple feature pyramid: images (B, 3, S, S) -> an ordered dict of
    maps "0".."3" at strides p/4, p/2, p, 2p and "pool" at 4p, each with ``out_channels`` channels (the backbone
    interface of torchvision's detection models)."""

    def __init__(self, vit: EvaViT, channels: int = 256):
        super().__init__()
        # The classifier side of the ViT gets no gradient here (the pyramid reads the last block's patch tokens):
        # drop it so that DDP finds no unused parameter. A windowed ViT has no cls token in its blocks (ViTDet):
        # it stays, frozen, for loading and saving; with global attention everywhere it attends and trains.
        vit.norm, vit.fc_norm, vit.head, vit.lm_head = nn.Identity(), nn.Identity(), nn.Identity(), None
        if vit.windowed:
            vit.cls_token.requires_grad_(False)
        if vit.mask_token is not None:
            vit.mask_token.requires_grad_(False)
        self.vit = vit
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, style="vitdet", out_channels=channels)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        last = self.vit.forward_intermediates(images, 1, output_fmt="NCHW", intermediates_only=True)
        maps = self.pyramid(last)
        named = OrderedDict((str(i), x) for i, x in enumerate(maps))
        named["pool"] = F.max_pool2d(maps[-1], kernel_size=1, stride=2)
        return named


def _detection_transform(img_size: int, head: DetectorHeadConfig):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class SquarePadTransform(GeneralizedRCNNTransform):
        """torchvision's transform with ViTDet's sizes: training images as given (already jittered and cropped),
        evaluation images resized to a longer side of ``img_size``, every batch padded to img_size x img_size."""

        def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
            batch = images[0].new_zeros((len(images), images[0].shape[0], img_size, img_size))
            for slot, image in zip(batch, images):
                height, width = image.shape[-2:]
                if height > img_size or width > img_size:
                    raise ValueError(f"a {height}x{width} image does not fit the detector's {img_size}x{img_size} "
                                     "input: crop training images to it (large-scale jitter does)")
                slot[:, :height, :width].copy_(image)
            return batch

    return SquarePadTransform(img_size, img_size, list(head.mean), list(head.std), _skip_resize=True)


def _build_mask_rcnn(backbone: ViTDetBackbone, num_classes: int, img_size: int, head: DetectorHeadConfig):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead

    from evamim._compat import enable_cpu_detection_ops

    enable_cpu_detection_ops()
    channels = head.channels
    anchors = AnchorGenerator(tuple((size,) for size in head.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, 3, conv_depth=head.rpn_convs),
        rpn_pre_nms_top_n_train=head.rpn_pre_nms_top_n[0],
        rpn_pre_nms_top_n_test=head.rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=head.rpn_post_nms_top_n[0],
        rpn_post_nms_top_n_test=head.rpn_post_nms_top_n[1],
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels] * head.box_convs, [head.box_fc_dim],
                                    norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(head.box_fc_dim, num_classes + 1),  # + the background
        box_batch_size_per_image=head.rois_per_image,
        box_score_thresh=head.score_threshold,
        box_nms_thresh=head.nms_threshold,
        box_detections_per_img=head.detections_per_image,
        mask_head=MaskRCNNHeads(channels, [channels] * head.mask_convs, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
        min_size=img_size,
        max_size=img_size,
    )
    model.transform = _detection_transform(img_size, head)
    _fix_pooler_scales(model, backbone.vit.config.patch_size)
    return model


def _fix_pooler_scales(model, patch_size: int) -> None:
    """Give the RoI poolers the pyramid's true scales (1 / stride: 4/p, 2/p, 1/p, 1/(2p)) now.

    torchvision's MultiScaleRoIAlign infers them on its first call from the largest *unpadded* image of that
    batch and keeps them for good; with every image padded to the same square, a first batch of small or
    landscape images would make it sample every later batch at twice the coordinates."""
    import math

    from torchvision.ops.poolers import initLevelMapper

    scales = [factor / patch_size for factor in SimpleFeaturePyramid.scales]
    levels = [int(round(-math.log2(scale))) for scale in (scales[0], scales[-1])]
    for pooler in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        pooler.scales = scales
        pooler.map_levels = initLevelMapper(levels[0], levels[1], canonical_scale=pooler.canonical_scale,
                                            canonical_level=pooler.canonical_level)


def patch_size_problem(patch_size: int) -> str | None:
    """Why a ViT with this patch size cannot be the detector's backbone, or None."""
    if patch_size >= 4 and not patch_size & (patch_size - 1):
        return None
    return (f"the detector's pyramid levels must have power-of-two strides (anchors, RoI levels), so the patch size "
            f"must be a power of two >= 4, got {patch_size}; use patch_size=16 (in evamim detect: "
            "model.options.patch_size=16; a pre-trained patch kernel is resampled, as EVA's detection converts its "
            "14-pixel patches to 16)")


class Detector(nn.Module):
    """Mask R-CNN on an EvaViT (see the module docstring): ``detector(images)`` -> detections (eval mode), or
    ``detector(images, targets)`` -> losses (training mode).

    The ViT is ``self.model.backbone.vit``; ``layer_id`` / ``num_layers`` / ``no_weight_decay`` expose its layers
    to the optimizer (layer-wise lr decay as detectron2's ``get_vit_lr_decay_rate``: embeddings 0, block i
    i + 1, everything else, pyramid and heads, at the full learning rate).
    """

    def __init__(self, vit: EvaViT, num_classes: int, head: DetectorHeadConfig | None = None):
        super().__init__()
        head = head or DetectorHeadConfig()
        problems = head.problems()
        if problems:
            raise ValueError("; ".join(problems))
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (object classes, without the background), got {num_classes}")
        height, width = vit.config.img_size
        problem = patch_size_problem(vit.config.patch_size)
        if problem:
            raise ValueError(problem)
        if height != width:
            raise ValueError(f"the detector pads images to a square; build the ViT with a square img_size, got "
                             f"{height}x{width}")
        self.num_classes = num_classes
        self.head_config = head
        self.model = _build_mask_rcnn(ViTDetBackbone(vit, head.channels), num_classes, height, head)

    @property
    def vit(self) -> EvaViT:
        return self.model.backbone.vit

    @property
    def img_size(self) -> int:
        return self.vit.config.img_size[0]

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None):
        return self.model(list(images), None if targets is None else list(targets))

    # ------------------------------------------------------------------------------- optimizer hooks
    VIT_PREFIX = "model.backbone.vit."

    def num_layers(self) -> int:
        return self.vit.num_layers()

    def layer_id(self, name: str) -> int:
        if name.startswith(self.VIT_PREFIX):
            return self.vit.layer_id(name[len(self.VIT_PREFIX):])
        return self.num_layers() + 1

    def no_weight_decay(self) -> set[str]:
        return {self.VIT_PREFIX + name for name in self.vit.no_weight_decay()}

    # ----------------------------------------------------------------------------------- saving
    def describe(self) -> dict:
        """Everything besides the weights needed to rebuild this detector (``save_detector``)."""
        return {"backbone": self.vit.config.to_dict(), "num_classes": self.num_classes,
                "head": asdict(self.head_config)}


DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_CONFIG = "detector.json"


def save_detector(model: Detector, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """``directory/detector.safetensors`` + ``detector.json`` (backbone config, classes, head; ``extra`` adds
    entries, e.g. the category names and ids)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / DETECTOR_WEIGHTS))
    atomic.write_json(directory / DETECTOR_CONFIG, {**model.describe(), **(extra or {})})
    return directory


def load_detector(directory: str | os.PathLike) -> tuple[Detector, dict]:
    """Rebuild a detector written by ``save_detector`` and load its weights strictly; returns it with the
    description (``extra`` entries included)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / DETECTOR_CONFIG).exists():
        raise FileNotFoundError(f"{directory} has no {DETECTOR_CONFIG}: not a directory written by save_detector")
    description = json.loads((directory / DETECTOR_CONFIG).read_text())
    head = DetectorHeadConfig(**description["head"])
    model = Detector(EvaViT(EvaViTConfig.from_dict(description["backbone"])), description["num_classes"], head)
    model.load_state_dict(load_file(str(directory / DETECTOR_WEIGHTS)))
    return model, description


__all__ = [
    "DETECTOR_CONFIG",
    "DETECTOR_WEIGHTS",
    "Detector",
    "DetectorHeadConfig",
    "ViTDetBackbone",
    "load_detector",
    "patch_size_problem",
    "save_detector",
]
