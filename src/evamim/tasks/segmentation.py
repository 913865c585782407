"""``evamim segment``: semantic segmentation (ADE20K folder layout) with a linear or a UPerNet head.

config -> the backbone (pre-trained EvaViT built at the crop size, pos_embed resampled) + a head on the outputs
of some of its blocks (``evamim.models.seg_heads``) -> AdamW with layer-wise lr decay and a poly schedule ->
the shared training loop on random-scale / crop / flip / photometric crops, with a per-pixel cross entropy that
ignores label 255 -> sliding-window evaluation (window = crop, logits averaged where windows overlap) scored by
a confusion matrix: mIoU, mean class accuracy, pixel accuracy and per-class IoU.

Output directory: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``model/``
(``segmenter.safetensors`` + ``segmenter.json``, reloadable with ``evamim.models.seg_heads.load_segmenter``),
``results.json``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from evamim.config import ConfigError, save_config, to_dict
from evamim.data.segmentation import IGNORE_INDEX, SegDataConfig
from evamim.engine import (
    CheckpointConfig,
    LoopConfig,
    OptimConfig,
    Precision,
    Trainer,
    build_optimizer,
)
from evamim.models.seg_heads import HEAD_KINDS
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import (
    BackboneSection,
    format_table,
    load_backbone,
    resolve_device,
    single_process_problem,
    training_run_problems,
    write_results,
)


logger = logging.getLogger(__name__)

# EvaViTConfig fields the task sets itself (the segmenter has no classifier, pooling or MIM head).
TASK_OWNED_OPTIONS = ("num_classes", "global_pool", "drop_path_rate", "mim_head_dim", "use_mask_token")

IOU_CONVENTION = (
    "IoU = TP / (TP + FP + FN) per class over all evaluated pixels; pixels labelled 255 are not counted. "
    "A class absent from both labels and predictions has IoU NaN (null in JSON) and is left out of mIoU; "
    "a class predicted but never labelled has IoU 0 and counts. Values in percent."
)


@dataclass
class SegHeadSection:
    """The segmentation head (see ``evamim.models.seg_heads``)."""

    kind: str = "upernet"
    """``linear`` (BatchNorm + 1x1 conv on one block's map) or ``upernet`` (simple feature pyramid + UPerNet)."""
    indices: list[int] | None = None
    """Blocks whose outputs feed the head (negative = from the end). None: the last block (linear); the ends of
    the four quarters of the depth (upernet: [2, 5, 8, 11] for 12 blocks). UPerNet takes 4 (or 1, ViTDet-style)."""
    channels: int = 512
    """UPerNet width (lateral, FPN and fusion convolutions)."""
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    """UPerNet's pyramid pooling output sizes."""
    dropout: float = 0.1
    """UPerNet: channel dropout before the classifier."""


@dataclass
class SegEvalSection:
    """Sliding-window evaluation on the validation split."""

    enabled: bool = True
    stride: int | None = None
    """Window step in pixels; None = two thirds of the crop (mmseg's 341 for 512)."""
    windows_per_batch: int = 8
    """Windows run through the model per forward call."""


@dataclass
class SegmentConfig:
    """Defaults: a ViT-B/16 UPerNet recipe on ADE20K (512 crop, batch 16, 160k steps); configs/segment/*.yaml
    hold the deltas."""

    backbone: BackboneSection = field(default_factory=BackboneSection)
    head: SegHeadSection = field(default_factory=SegHeadSection)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    eval: SegEvalSection = field(default_factory=SegEvalSection)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-4, min_lr=0.0, schedule="poly", poly_power=1.0, warmup_steps=1500, weight_decay=0.05,
            betas=(0.9, 0.999), eps=1e-8, layer_decay=0.65, clip_grad=None,
        )
    )
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(total_steps=160_000, eval_every=16_000))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=4000))
    drop_path_rate: float = 0.1
    freeze_backbone: bool = False
    """Train the head only (a segmentation probe of frozen features); needs drop_path_rate=0."""
    batch_size: int = 16
    """Crops per process and optimizer step."""
    output_dir: str = "runs/segment"
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------------- validation
def backbone_overrides(config: SegmentConfig) -> dict[str, Any]:
    """The EvaViTConfig fields this task sets on top of ``backbone.options``."""
    return {
        "img_size": config.data.crop_size,
        "num_classes": 0,
        "global_pool": "",
        "drop_path_rate": config.drop_path_rate,
        "mim_head_dim": None,
        "use_mask_token": False,
    }


def _check_backbone_config(config: SegmentConfig) -> str | None:
    from evamim.models.checkpoint import read_config
    from evamim.models.presets import model_config
    from evamim.models.vit import EvaViTConfig, feature_take_indices

    overrides = {**config.backbone.options, **backbone_overrides(config)}
    try:
        if config.backbone.name is not None:
            vit_config = model_config(config.backbone.name, **overrides)
        else:  # the architecture comes from an evamim directory (or .safetensors with its config)
            vit_config = EvaViTConfig.from_dict({**read_config(config.backbone.pretrained).to_dict(), **overrides})
    except (ValueError, FileNotFoundError) as error:
        return f"backbone (built at data.crop_size={config.data.crop_size}): {error}"
    if config.head.indices is not None:
        try:
            feature_take_indices(vit_config.depth, config.head.indices)
        except ValueError as error:
            return f"head.indices: {error}"
    return None


def validate(config: SegmentConfig) -> None:
    """Raise ConfigError for anything that would fail later, before any data or model is built."""
    launch_problem = single_process_problem("segment")
    if launch_problem:
        raise ConfigError(launch_problem)
    problems = []
    backbone = config.backbone
    if backbone.pretrained is None and backbone.name is None:
        problems.append("set backbone.pretrained (an evamim model directory or weights file) "
                        "and/or backbone.name (a preset)")
    elif backbone.pretrained is not None and not Path(backbone.pretrained).exists():
        problems.append(f"backbone.pretrained {backbone.pretrained} does not exist: give the pre-trained weights")
    for key in TASK_OWNED_OPTIONS:
        if key in backbone.options:
            hint = ": use drop_path_rate" if key == "drop_path_rate" else ""
            problems.append(f"backbone.options.{key} is set by this task{hint}")
    img_size = backbone.options.get("img_size")
    if img_size is not None and img_size != config.data.crop_size:
        problems.append(f"backbone.options.img_size={img_size} but data.crop_size={config.data.crop_size}: the "
                        "backbone is built at the crop size; make them equal")
    if not config.data.root:
        problems.append("data.root is empty: point it at the dataset (images/<split>, annotations/<split>)")
    problems += _head_problems(config.head)
    if config.freeze_backbone and config.drop_path_rate:
        problems.append(f"freeze_backbone=true needs drop_path_rate=0 (got {config.drop_path_rate}): a frozen backbone "
                        "should compute the same features in training and evaluation")
    if config.batch_size < 1 or config.batch_size % max(config.loop.grad_accum_steps, 1):
        problems.append(f"batch_size {config.batch_size} must be >= 1 and divisible by loop.grad_accum_steps "
                        f"{config.loop.grad_accum_steps}")
    stride = config.eval.stride
    if stride is not None and not 1 <= stride <= config.data.crop_size:
        problems.append(f"eval.stride must be in [1, data.crop_size={config.data.crop_size}], got {stride}")
    if config.eval.windows_per_batch < 1:
        problems.append(f"eval.windows_per_batch must be >= 1, got {config.eval.windows_per_batch}")
    if not problems:
        problem = _check_backbone_config(config)
        if problem:
            problems.append(problem)
    problems += training_run_problems(config)
    if problems:
        raise ConfigError("invalid segmentation config:\n  " + "\n  ".join(problems))


def _head_problems(head: SegHeadSection) -> list[str]:
    problems = []
    if head.kind not in HEAD_KINDS:
        problems.append(f"head.kind must be one of {HEAD_KINDS}, got {head.kind!r}")
    elif head.indices is not None:
        allowed = (1,) if head.kind == "linear" else (1, 4)
        if len(head.indices) not in allowed:
            problems.append(f"head.indices: the {head.kind} head reads {' or '.join(map(str, allowed))} blocks, "
                            f"got {list(head.indices)}")
    if head.channels < 1:
        problems.append(f"head.channels must be >= 1, got {head.channels}")
    if not 0 <= head.dropout < 1:
        problems.append(f"head.dropout must be in [0, 1), got {head.dropout}")
    if not head.pool_scales or min(head.pool_scales) < 1:
        problems.append(f"head.pool_scales must be positive sizes, got {list(head.pool_scales)}")
    return problems


# ---------------------------------------------------------------------------------------------- model
def build_segmenter(config: SegmentConfig) -> nn.Module:
    """Backbone (pre-trained, at the crop size) + head, as a ``Segmenter``; the backbone frozen on request."""
    from evamim.models.seg_heads import Segmenter

    backbone = load_backbone(config.backbone, **backbone_overrides(config))
    head = config.head
    model = Segmenter(backbone, config.data.num_classes, kind=head.kind, indices=head.indices, channels=head.channels,
                      pool_scales=tuple(head.pool_scales), dropout=head.dropout)
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


# -------------------------------------------------------------------------------------------- training
def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross entropy averaged over the labelled pixels, in fp32.

    logits (B, K, H, W); labels (B, H, W) long with 255 = ignore. A batch without labelled pixels gives 0
    (with a graph), not NaN.
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class SegmentationStep:
    """The objective as the loop sees it: ``(model, batch) -> {"loss", "pixel_acc"}`` on crops and their labels."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        logits = model(images)
        valid = labels != IGNORE_INDEX
        correct = ((logits.argmax(1) == labels) & valid).sum()
        return {"loss": segmentation_loss(logits, labels),
                "pixel_acc": 100.0 * correct.float() / valid.sum().clamp(min=1)}


# ------------------------------------------------------------------------------------------ evaluation
class ConfusionMatrix:
    """Pixel counts of (label, prediction) pairs: a (K, K) int64 matrix, rows = label, columns = prediction.

    Pixels labelled 255 are skipped whatever their prediction. See ``IOU_CONVENTION`` for how absent classes
    are treated.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """prediction and label: integer tensors of the same shape; label 255 = ignore."""
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != IGNORE_INDEX
        label, prediction = label[valid].long(), prediction[valid].long().to(label.device)
        k = self.num_classes
        if label.numel() and (label.min() < 0 or label.max() >= k):
            raise ValueError(f"labels must be in [0, {k}) or {IGNORE_INDEX}; found {int(label.min())}..{int(label.max())}")
        if prediction.numel() and (prediction.min() < 0 or prediction.max() >= k):
            raise ValueError(f"predictions must be in [0, {k}); found {int(prediction.min())}..{int(prediction.max())}")
        counts = torch.bincount(label * k + prediction, minlength=k * k).reshape(k, k)
        self.matrix += counts.to(self.matrix.device)

    def iou(self) -> torch.Tensor:
        """(K,) float64 IoU per class in [0, 1]; NaN for a class in neither the labels nor the predictions."""
        matrix = self.matrix.double()
        intersection = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - intersection
        return intersection / union  # 0 / 0 = NaN for absent classes

    def class_accuracy(self) -> torch.Tensor:
        """(K,) float64 recall per class (correct / labelled pixels); NaN for a class never labelled."""
        matrix = self.matrix.double()
        return matrix.diagonal() / matrix.sum(1)

    def summary(self) -> dict[str, float]:
        """``mIoU`` (nanmean of IoU), ``mAcc`` (nanmean of class accuracy), ``aAcc`` (pixel accuracy), in percent."""
        total = self.matrix.sum()
        return {
            "mIoU": 100.0 * float(self.iou().nanmean()),
            "mAcc": 100.0 * float(self.class_accuracy().nanmean()),
            "aAcc": 100.0 * float(self.matrix.diagonal().sum().double() / total) if total else float("nan"),
        }


class SegEval:
    """The loop's ``eval_fn``: sliding-window logits on each validation image (resized to the label's size),
    argmax, confusion matrix. Keeps the last matrix in ``self.last`` for the per-class results."""

    def __init__(self, loader, device: torch.device, num_classes: int, window: tuple[int, int], stride: int,
                 windows_per_batch: int):
        self.loader = loader
        self.device = device
        self.num_classes = num_classes
        self.window = window
        self.stride = stride
        self.windows_per_batch = windows_per_batch
        self.last: ConfusionMatrix | None = None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from evamim.models.seg_heads import slide_inference

        matrix = ConfusionMatrix(self.num_classes, self.device)
        for batch in self.loader:
            images = batch["images"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            logits = slide_inference(model, images, self.num_classes, self.window, self.stride, self.windows_per_batch)
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            matrix.update(logits.argmax(1), labels)
        if not int(matrix.matrix.sum()):
            raise RuntimeError("the validation data has no labelled pixels to score")
        self.last = matrix
        return matrix.summary()


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else 100.0 * v for v in values.tolist()]


# --------------------------------------------------------------------------------------------- the run
def run_segmentation(config: SegmentConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Train and evaluate a segmenter, writing the output directory (see the module docstring); returns the
    results dict. Re-running with the same output_dir resumes from the newest checkpoint."""
    from evamim.data.segmentation import build_seg_loader
    from evamim.models.seg_heads import save_segmenter

    validate(config)
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    torch.manual_seed(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")

    try:
        train_loader = build_seg_loader(config.data, "train", config.batch_size)
        eval_loader = build_seg_loader(config.data, "eval") if config.eval.enabled else None
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data: {error}") from None
    model = build_segmenter(config).to(device)
    logger.info("segmenter (%s head) with %.1fM parameters (%.1fM trainable), %d classes, %d px crops",
                config.head.kind, sum(p.numel() for p in model.parameters()) / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, config.data.num_classes,
                config.data.crop_size)
    evaluator = None
    if eval_loader is not None:
        stride = config.eval.stride or max(1, config.data.crop_size * 2 // 3)
        evaluator = SegEval(eval_loader, device, config.data.num_classes, model.window, stride,
                            config.eval.windows_per_batch)
    trainer = Trainer(
        model,
        SegmentationStep(device),
        train_loader,
        build_optimizer(model, config.optim),
        optim=config.optim,
        loop=config.loop,
        checkpoint=config.checkpoint,
        out_dir=output_dir,
        hooks=list(hooks),
        eval_fn=evaluator,
        config=to_dict(config),
    )
    result = trainer.train()
    model_dir = save_segmenter(model, output_dir / "model")
    results = {
        "task": "segment",
        "steps": result.step,
        "head": config.head.kind,
        "indices": model.indices,
        "num_classes": config.data.num_classes,
        "crop_size": config.data.crop_size,
        "train_loss": result.metrics.get("loss"),
        "nonfinite_skipped": result.nonfinite_skipped,
        "data": result.data_totals,
        "model_dir": str(model_dir),
    }
    if evaluator is not None:
        results.update(final_scores(model, evaluator, config.loop.precision, device))
    write_results(output_dir, config, results)
    return results


def final_scores(model: nn.Module, evaluator: SegEval, precision: str, device: torch.device) -> dict[str, Any]:
    """mIoU / mAcc / aAcc and per-class IoU / accuracy of the loop's last evaluation, or of a new one when the
    loop had nothing to do (a finished run that was re-run)."""
    if evaluator.last is None:
        model.eval()
        with torch.no_grad(), Precision(precision, device.type).autocast():
            evaluator(model)
    matrix = evaluator.last
    return {
        **matrix.summary(),
        "per_class_iou": _nan_to_none(matrix.iou()),
        "per_class_acc": _nan_to_none(matrix.class_accuracy()),
        "iou_convention": IOU_CONVENTION,
    }


def results_table(results: Mapping[str, Any]) -> str:
    """The console summary: mIoU / mAcc / aAcc of the final model."""
    row = {"head": results["head"], "steps": results["steps"]}
    for key in ("mIoU", "mAcc", "aAcc"):
        if key in results:
            row[key] = float(results[key])
    if "mIoU" not in results and results.get("train_loss") is not None:
        row["train_loss"] = float(results["train_loss"])
    return format_table([row])


# ---------------------------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/segment/eva_b16_ade20k_upernet.yaml",
                         "backbone.pretrained=runs/pretrain/model data.root=/data/ADEChallengeData2016")


def run(args: argparse.Namespace) -> int:
    code, config, results, _ = run_config_command("segment", SegmentConfig, run_segmentation, args)
    if code == 0:
        print(f"results: {Path(config.output_dir) / 'results.json'}")
        print(results_table(results))
    return code


__all__ = [
    "ConfusionMatrix",
    "IOU_CONVENTION",
    "SegEval",
    "SegEvalSection",
    "SegHeadSection",
    "SegmentConfig",
    "SegmentationStep",
    "build_segmenter",
    "run_segmentation",
    "segmentation_loss",
    "validate",
]
