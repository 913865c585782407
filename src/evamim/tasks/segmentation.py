"""``evamim segment``: semantic segmentation (ADE20K folder layout) with a linear or a UPerNet head.

config -> the backbone (pre-trained EvaViT built at the crop size, pos_embed resampled) + a head on the outputs
of some of its blocks (``evamim.models.seg_heads``) -> AdamW with layer-wise lr decay and a poly schedule ->
the shared training loop on random-scale / crop / flip / photometric crops, with a per-pixel cross entropy that
ignores label 255 -> sliding-window evaluation (window = crop, logits averaged where windows overlap) scored by
a confusion matrix: mIoU, mean class accuracy, pixel accuracy and per-class IoU.

Runs on the task runner (``evamim.tasks.runner``): one process or many (ddp or zero1; BatchNorm layers then
normalise over the global batch, like mmseg's SyncBN), with checkpoints and exact resume. Output directory:
``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``model/`` (``segmenter.safetensors`` +
``segmenter.json``, reloadable with ``evamim.models.seg_heads.load_segmenter``), ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from evamim.config import ConfigError
from evamim.data.segmentation import SegDataConfig
from evamim.engine import CheckpointConfig, LoopConfig, OptimConfig
from evamim.engine.distributed import DistributedConfig
from evamim.models.seg_heads import HEAD_KINDS
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import (
    TrainedModelSection,
    backbone_config,
    format_table,
    load_backbone,
    model_problems,
    training_run_problems,
)
from evamim.tasks.runner import RunContext, TrainingParts, run_training
from evamim.tasks.seg_metrics import (
    IOU_CONVENTION,
    ConfusionMatrix,
    SegEvaluation,
    SegmentationStep,
    nan_to_none,
    segmentation_loss,
)

logger = logging.getLogger(__name__)

# EvaViTConfig fields the task sets itself (the segmenter has no classifier, pooling or MIM head).
TASK_OWNED_OPTIONS = {
    "num_classes": None,
    "global_pool": None,
    "drop_path_rate": "model.drop_path_rate",
    "grad_checkpointing": "model.grad_checkpointing",
    "img_size": "data.crop_size",
    "mim_head_dim": None,
    "use_mask_token": None,
}

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
class SegValidationData:
    """``val_data.*``: the validation images and labels, read and transformed with ``data``'s settings."""

    path: str | None = None
    """Dataset root holding ``images/<split>/`` and ``annotations/<split>/``; None = ``data.root``."""
    split: str = "validation"
    limit: int | None = None
    """Score only the first this many validation images (quick checks); None = all."""


@dataclass
class SegEvalSection:
    """Sliding-window evaluation on ``val_data``."""

    enabled: bool = True
    stride: int | None = None
    """Window step in pixels; None = two thirds of the crop (mmseg's 341 for 512)."""
    windows_per_batch: int = 8
    """Windows run through the model per forward call."""


@dataclass
class SegmentConfig:
    """Defaults: a ViT-B/16 UPerNet recipe on ADE20K (512 crop, batch 16, 160k steps); the recipes
    (evamim list recipes) hold the deltas."""

    model: TrainedModelSection = field(default_factory=TrainedModelSection)
    head: SegHeadSection = field(default_factory=SegHeadSection)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    val_data: SegValidationData = field(default_factory=SegValidationData)
    eval: SegEvalSection = field(default_factory=SegEvalSection)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-4, min_lr=0.0, schedule="poly", poly_power=1.0, warmup_steps=1500, weight_decay=0.05,
            betas=(0.9, 0.999), eps=1e-8, layer_decay=0.65, clip_grad=None,
        )
    )
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(total_steps=160_000, eval_every=16_000))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=4000))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes share the model: ddp or zero1 (docs/multi-node.md)."""
    freeze_backbone: bool = False
    """Train the head only (a segmentation probe of frozen features); needs model.drop_path_rate=0."""
    batch_size: int = 16
    """Crops per process and optimizer step; with ``global_batch_size`` set: per forward (see tasks/batching.py)."""
    global_batch_size: int | None = None
    """Crops per optimizer step over all processes (the accumulation is derived); None = ``batch_size`` x processes."""
    output_dir: str = "runs/segment"
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------------- validation
def backbone_overrides(config: SegmentConfig) -> dict[str, Any]:
    """The EvaViTConfig fields this task sets on top of ``model.options``."""
    return {
        "img_size": config.data.crop_size,
        "num_classes": 0,
        "global_pool": "",
        "drop_path_rate": config.model.drop_path_rate,
        "grad_checkpointing": config.model.grad_checkpointing,
        "mim_head_dim": None,
        "use_mask_token": False,
    }


def _check_backbone_config(config: SegmentConfig) -> str | None:
    from evamim.models.vit import feature_take_indices

    try:
        vit_config = backbone_config(config.model, backbone_overrides(config))
    except (ValueError, FileNotFoundError) as error:
        return f"model (built at data.crop_size={config.data.crop_size}): {error}"
    if config.head.indices is not None:
        try:
            feature_take_indices(vit_config.depth, config.head.indices)
        except ValueError as error:
            return f"head.indices: {error}"
    return None


def validate(config: SegmentConfig) -> None:
    """Raise ConfigError for anything that would fail later, before any data or model is built."""
    problems = model_problems(config.model, TASK_OWNED_OPTIONS)
    if not config.data.root:
        problems.append("data.root is empty: point it at the dataset (images/<split>, annotations/<split>)")
    problems += _head_problems(config.head)
    if config.freeze_backbone and config.model.drop_path_rate:
        problems.append(f"freeze_backbone=true needs model.drop_path_rate=0 (got {config.model.drop_path_rate}): a "
                        "frozen backbone should compute the same features in training and evaluation")
    if config.distributed.strategy == "fsdp":
        problems.append("distributed.strategy=fsdp is not available for segment: the sliding-window evaluation "
                        "runs a different number of forwards per image and process; use ddp or zero1")
    stride = config.eval.stride
    if stride is not None and not 1 <= stride <= config.data.crop_size:
        problems.append(f"eval.stride must be in [1, data.crop_size={config.data.crop_size}], got {stride}")
    if config.eval.windows_per_batch < 1:
        problems.append(f"eval.windows_per_batch must be >= 1, got {config.eval.windows_per_batch}")
    if config.val_data.limit is not None and config.val_data.limit < 1:
        problems.append(f"val_data.limit must be >= 1 or null, got {config.val_data.limit}")
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

    backbone = load_backbone(config.model, **backbone_overrides(config))
    head = config.head
    model = Segmenter(backbone, config.data.num_classes, kind=head.kind, indices=head.indices, channels=head.channels,
                      pool_scales=tuple(head.pool_scales), dropout=head.dropout)
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------- the task
def val_data_config(config: SegmentConfig) -> SegDataConfig:
    """``data`` pointed at the validation images' root (the split and limit are ``val_data``'s)."""
    return dataclasses.replace(config.data, root=config.val_data.path or config.data.root)


class SegmentTask:
    """Segmentation for the runner: the segmenter is trained and wrapped; BatchNorm spans the processes."""

    name = "segment"

    def validate(self, config: SegmentConfig) -> None:
        validate(config)

    def build(self, config: SegmentConfig, context: RunContext) -> TrainingParts:
        from evamim.data.segmentation import build_seg_loader
        from evamim.engine.sync_batchnorm import convert_batchnorm
        from evamim.models.seg_heads import save_segmenter

        shares = dict(rank=context.rank, world_size=context.world_size)
        try:
            loader = build_seg_loader(config.data, "train", context.batch_size, **shares)
            val_loader = None
            if config.eval.enabled:
                val = config.val_data
                val_loader = build_seg_loader(val_data_config(config), "eval", split=val.split, limit=val.limit,
                                              **shares)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data: {error}") from None
        model = build_segmenter(config).to(context.device)
        if context.world_size > 1:
            model = convert_batchnorm(model, context.device)
        logger.info("segmenter (%s head), %d classes, %d px crops", config.head.kind, config.data.num_classes,
                    config.data.crop_size)
        evaluation = None
        if val_loader is not None:
            stride = config.eval.stride or max(1, config.data.crop_size * 2 // 3)
            evaluation = SegEvaluation(val_loader, context.device, config.data.num_classes, model.window, stride,
                                       config.eval.windows_per_batch)
        self.model, self.evaluation = model, evaluation
        return TrainingParts(
            model=model,
            step=SegmentationStep(context.device),
            data=loader,
            sync_buffers=True,  # BatchNorm running statistics: the same on every process
            evaluation=evaluation,
            export=lambda full, out: {"model_dir": str(save_segmenter(full, out / "model"))},
        )

    def results(self, config: SegmentConfig, result: Any, parts: TrainingParts) -> dict[str, Any]:
        results = {"head": config.head.kind, "indices": self.model.indices, "num_classes": config.data.num_classes,
                   "crop_size": config.data.crop_size}
        if self.evaluation is not None and self.evaluation.last is not None:
            matrix = self.evaluation.last
            results.update({**matrix.summary(), "per_class_iou": nan_to_none(matrix.iou()),
                            "per_class_acc": nan_to_none(matrix.class_accuracy()), "iou_convention": IOU_CONVENTION})
        return results


def run_segmentation(config: SegmentConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Train and evaluate a segmenter, writing the output directory (see the module docstring); returns the
    summary. Re-running with the same output_dir resumes from the newest checkpoint."""
    return run_training(SegmentTask(), config, hooks)


def dry_run(config: SegmentConfig) -> str:
    """``evamim segment --dry-run``: the plan, with the segmenter built on the meta device."""
    from evamim.models.seg_heads import Segmenter
    from evamim.models.vit import EvaViT
    from evamim.tasks.plan import describe_run

    validate(config)
    vit = backbone_config(config.model, backbone_overrides(config))
    head = config.head
    with torch.device("meta"):
        model = Segmenter(EvaViT(vit), config.data.num_classes, kind=head.kind, indices=head.indices,
                          channels=head.channels, pool_scales=tuple(head.pool_scales), dropout=head.dropout)
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    lines = [f"segmenter: {head.kind} head on blocks {model.indices}, {config.data.num_classes} classes, "
             f"{config.data.crop_size} px crops ({vit.grid_size[0]}x{vit.grid_size[1]} patches)",
             f"validation: {(config.val_data.path or config.data.root) + '/' + config.val_data.split if config.eval.enabled else 'off'}"]
    return describe_run(config, {"segmenter": model}, lines, dataset=_train_images(config))


def _train_images(config: SegmentConfig) -> tuple[int | None, str]:
    """(training images, where) or (None, why they cannot be counted)."""
    from evamim.data.segmentation import ade20k_pairs

    where = f"{config.data.root}/images/{config.data.train_split}"
    try:
        return len(ade20k_pairs(config.data.root, config.data.train_split)), where
    except (FileNotFoundError, ValueError, OSError) as error:
        return None, str(error)


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
    add_config_arguments(parser, None,
                         "model.pretrained=runs/pretrain/model data.root=/data/ADEChallengeData2016")


def run(args: argparse.Namespace) -> int:
    code, config, summary, rank = run_config_command("segment", SegmentConfig, run_segmentation, args,
                                                     dry_run_fn=dry_run)
    if code == 0 and rank == 0:
        print(f"summary: {Path(config.output_dir) / 'summary.json'}")
        print(results_table(summary))
    return code


__all__ = [
    "ConfusionMatrix",
    "IOU_CONVENTION",
    "SegEvaluation",
    "SegValidationData",
    "SegEvalSection",
    "SegHeadSection",
    "SegmentConfig",
    "SegmentationStep",
    "build_segmenter",
    "run_segmentation",
    "segmentation_loss",
    "validate",
]
