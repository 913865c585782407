"""``evamim detect``: object detection and instance segmentation (COCO format), ViTDet-style Mask R-CNN.

config -> the backbone (pre-trained EvaViT built at ``data.img_size`` with window attention in every block but
``model.global_blocks``, pos_embed resampled; global-attention weights load unchanged) + the simple feature
pyramid + torchvision's Mask R-CNN heads (``evamim.models.detector``) -> AdamW with layer-wise lr decay and a
multi-step schedule -> the shared training loop on large-scale-jittered images (``evamim.data.detection``) ->
full-image inference on the validation set, scored by pycocotools' COCOeval (box and mask AP,
``evamim.tasks.det_metrics``), the records gathered over processes.

Runs on the task runner (``evamim.tasks.runner``): one process or many (ddp or zero1), with checkpoints and exact
resume. Output directory: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``model/``
(``detector.safetensors`` + ``detector.json``, reloadable with ``evamim.models.detector.load_detector``),
``summary.json``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim.config import ConfigError
from evamim.data.detection import DetDataConfig
from evamim.engine import CheckpointConfig, LoopConfig, OptimConfig
from evamim.engine.distributed import DistributedConfig
from evamim.models.detector import DetectorHeadConfig, patch_size_problem
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

logger = logging.getLogger(__name__)

# EvaViTConfig fields the task sets itself.
TASK_OWNED_OPTIONS = {
    "num_classes": None,
    "global_pool": None,
    "drop_path_rate": "model.drop_path_rate",
    "grad_checkpointing": "model.grad_checkpointing",
    "img_size": "data.img_size",
    "mim_head_dim": None,
    "use_mask_token": None,
    "window_size": "model.window_size",
    "global_blocks": "model.global_blocks",
}


@dataclass
class DetectModelSection(TrainedModelSection):
    """``model.*``: the pre-trained ViT and its window attention."""

    window_size: int = 16
    """Window attention in every block but ``global_blocks`` (ViTDet: 14 for ViT-B at 1024 px with padding;
    evamim needs a size that divides the patch grid: 16 for 1024 / 16); 0 = global attention everywhere."""
    global_blocks: list[int] | None = None
    """Blocks that keep global attention; None = the last block of each quarter of the depth (ViTDet: 2, 5, 8, 11
    for 12 blocks). With window_size=0 every block is global and this must stay None."""


@dataclass
class DetValidationData:
    """``val_data.*``: the validation images and their COCO JSON (the ground truth COCOeval scores against)."""

    images: str | None = None
    annotations: str | None = None
    limit: int | None = None
    """Score only the first this many validation images (quick checks); None = all."""


@dataclass
class DetEvalSection:
    enabled: bool = True
    batch_size: int = 1
    """Validation images per forward."""


@dataclass
class DetectConfig:
    """Defaults: ViTDet's ViT-B Mask R-CNN on COCO (1024 LSJ, batch 64, 184,375 steps = 100 epochs, lr 1e-4, layer
    decay 0.7, drop path 0.1); the recipes (``evamim list recipes``) hold EVA's deltas."""

    model: DetectModelSection = field(default_factory=DetectModelSection)
    head: DetectorHeadConfig = field(default_factory=DetectorHeadConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    val_data: DetValidationData = field(default_factory=DetValidationData)
    eval: DetEvalSection = field(default_factory=DetEvalSection)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-4, min_lr=0.0, schedule="step", milestones=[163_889, 177_546], gamma=0.1, warmup_steps=250,
            weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, layer_decay=0.7, clip_grad=None,
        )
    )
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(total_steps=184_375, eval_every=18_438))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=5000))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes share the model: ddp or zero1 (docs/multi-node.md)."""
    batch_size: int = 1
    """Images per process and forward; with ``global_batch_size`` set the accumulation is derived (tasks/batching.py)."""
    global_batch_size: int | None = 64
    """Images per optimizer step over all processes (ViTDet / EVA: 64); None = ``batch_size`` x processes."""
    output_dir: str = "runs/detect"
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------------- validation
def global_blocks(config: DetectConfig, depth: int) -> list[int]:
    """``model.global_blocks``, or ViTDet's default: the last block of each quarter (none without windows)."""
    from evamim.models.seg_heads import default_indices

    if not config.model.window_size:
        return []
    if config.model.global_blocks is not None:
        return [int(i) for i in config.model.global_blocks]
    return default_indices("upernet", depth)


def _vit_config(config: DetectConfig):
    """The backbone's EvaViTConfig (raises ValueError / FileNotFoundError)."""
    from evamim.models.vit import EvaViTConfig

    base = backbone_config(config.model, _plain_overrides(config))
    return EvaViTConfig.from_dict({**base.to_dict(), "window_size": config.model.window_size,
                                   "global_blocks": global_blocks(config, base.depth)})


def _plain_overrides(config: DetectConfig) -> dict[str, Any]:
    return {
        "img_size": config.data.img_size,
        "num_classes": 0,
        "global_pool": "",
        "drop_path_rate": config.model.drop_path_rate,
        "grad_checkpointing": config.model.grad_checkpointing,
        "mim_head_dim": None,
        "use_mask_token": False,
    }


def backbone_overrides(config: DetectConfig) -> dict[str, Any]:
    """The EvaViTConfig fields this task sets on top of ``model.options``."""
    vit = _vit_config(config)
    return {**_plain_overrides(config), "window_size": vit.window_size, "global_blocks": list(vit.global_blocks)}


def _path_problems(config: DetectConfig) -> list[str]:
    found = []
    checks = [("data.images", config.data.images, "dir"), ("data.annotations", config.data.annotations, "file")]
    if config.eval.enabled:
        checks += [("val_data.images", config.val_data.images, "dir"),
                   ("val_data.annotations", config.val_data.annotations, "file")]
    for key, value, kind in checks:
        if not value:
            hint = " (or eval.enabled=false)" if key.startswith("val_data") else ""
            found.append(f"{key} is empty: give the {'image folder' if kind == 'dir' else 'COCO JSON file'}{hint}")
        elif kind == "dir" and not Path(value).is_dir():
            found.append(f"{key} {value} is not a folder")
        elif kind == "file" and not Path(value).is_file():
            found.append(f"{key} {value} does not exist")
    return found


def validate(config: DetectConfig) -> None:
    """Raise ConfigError for anything that would fail later, before any data or model is built."""
    problems = model_problems(config.model, TASK_OWNED_OPTIONS)
    problems += _path_problems(config)
    problems += config.head.problems() + config.data.problems()
    if config.model.window_size < 0:
        problems.append(f"model.window_size must be >= 0 (0 = global attention), got {config.model.window_size}")
    if not config.model.window_size and config.model.global_blocks:
        problems.append(f"model.global_blocks {list(config.model.global_blocks)} only apply with window attention: "
                        "set model.window_size, or leave model.global_blocks null")
    if config.distributed.strategy == "fsdp":
        problems.append("distributed.strategy=fsdp is not available for detect (not tested with torchvision's "
                        "detection heads); use ddp or zero1")
    if config.eval.batch_size < 1:
        problems.append(f"eval.batch_size must be >= 1, got {config.eval.batch_size}")
    if config.val_data.limit is not None and config.val_data.limit < 1:
        problems.append(f"val_data.limit must be >= 1 or null, got {config.val_data.limit}")
    if not problems:
        try:
            problem = patch_size_problem(_vit_config(config).patch_size)
        except (ValueError, FileNotFoundError) as error:
            problem = (f"model (built at data.img_size={config.data.img_size}, window_size="
                       f"{config.model.window_size}): {error}")
        if problem:
            problems.append(problem)
    problems += training_run_problems(config)
    if problems:
        raise ConfigError("invalid detection config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------- model
def build_detector(config: DetectConfig, num_classes: int):
    """The pre-trained backbone (windowed, at ``data.img_size``) + Mask R-CNN for ``num_classes`` categories."""
    from evamim.models.detector import Detector

    backbone = load_backbone(config.model, **backbone_overrides(config))
    return Detector(backbone, num_classes, config.head)


class DetectionStep:
    """One training forward: the detector's losses on a batch of images and targets; ``loss`` is their sum
    (torchvision's Mask R-CNN losses, each a mean over its samples)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images = [image.to(self.device, non_blocking=True) for image in batch["images"]]
        targets = [{key: value.to(self.device, non_blocking=True) for key, value in target.items()}
                   for target in batch["targets"]]
        losses = model(images, targets)
        return {"loss": sum(losses.values()), **{name: value.detach() for name, value in losses.items()}}


# ---------------------------------------------------------------------------------------------- the task
class DetectTask:
    """Detection for the runner: the detector is trained and wrapped; COCOeval scores the gathered detections."""

    name = "detect"

    def validate(self, config: DetectConfig) -> None:
        validate(config)

    def build(self, config: DetectConfig, context: RunContext) -> TrainingParts:
        from evamim.data.detection import CocoAnnotations, build_det_loader
        from evamim.models.detector import save_detector
        from evamim.tasks.det_metrics import DetectionEvaluation

        shares = dict(rank=context.rank, world_size=context.world_size)
        try:
            train_annotations = CocoAnnotations(config.data.annotations)
            loader = build_det_loader(config.data, "train", context.batch_size, annotations=train_annotations,
                                      **shares)
            evaluation = None
            if config.eval.enabled:
                val = config.val_data
                val_annotations = CocoAnnotations(val.annotations, for_evaluation=True)
                if val_annotations.category_ids != train_annotations.category_ids:
                    raise ValueError(f"the validation categories {val_annotations.category_ids} are not the training "
                                     f"ones {train_annotations.category_ids}: the labels would not match")
                val_loader = build_det_loader(config.data, "eval", config.eval.batch_size, images=val.images,
                                              annotations=val_annotations, limit=val.limit, **shares)
        except (FileNotFoundError, ValueError, ImportError) as error:
            raise ConfigError(f"data: {error}") from None
        self.categories = {"category_ids": train_annotations.category_ids,
                           "category_names": train_annotations.category_names}
        model = build_detector(config, train_annotations.num_classes).to(context.device)
        if config.eval.enabled:
            evaluation = DetectionEvaluation(val_loader, context.device, val_annotations)
        logger.info("detector: Mask R-CNN, %d categories, %d px, window %d, global blocks %s",
                    train_annotations.num_classes, config.data.img_size, model.vit.config.window_size,
                    list(model.vit.config.global_blocks))
        self.model, self.evaluation = model, evaluation
        return TrainingParts(
            model=model,
            step=DetectionStep(context.device),
            data=loader,
            evaluation=evaluation,
            export=lambda full, out: {"model_dir": str(save_detector(full, out / "model", self.categories))},
        )

    def results(self, config: DetectConfig, result: Any, parts: TrainingParts) -> dict[str, Any]:
        results = {"num_classes": len(self.categories["category_ids"]), **self.categories,
                   "img_size": config.data.img_size, "window_size": self.model.vit.config.window_size,
                   "global_blocks": list(self.model.vit.config.global_blocks)}
        if self.evaluation is not None and self.evaluation.last is not None:
            results.update(self.evaluation.last)
        return results


def run_detection(config: DetectConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Train and evaluate a detector, writing the output directory (see the module docstring); returns the
    summary. Re-running with the same output_dir resumes from the newest checkpoint."""
    return run_training(DetectTask(), config, hooks)


def results_table(results: Mapping[str, Any]) -> str:
    """The console summary: box and mask AP / AP50 / AP75 of the final model."""
    row: dict[str, Any] = {"steps": results["steps"]}
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        if results.get(key) is not None:
            row[key] = float(results[key])
    if "bbox_AP" not in results and results.get("train_loss") is not None:
        row["train_loss"] = float(results["train_loss"])
    return format_table([row])


# ---------------------------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None,
                         "model.pretrained=runs/pretrain/model data.images=coco/train2017 "
                         "data.annotations=coco/annotations/instances_train2017.json val_data.images=coco/val2017 "
                         "val_data.annotations=coco/annotations/instances_val2017.json")


def run(args: argparse.Namespace) -> int:
    code, config, summary, rank = run_config_command("detect", DetectConfig, run_detection, args)
    if code == 0 and rank == 0:
        print(f"summary: {Path(config.output_dir) / 'summary.json'}")
        print(results_table(summary))
    return code


__all__ = [
    "DetEvalSection",
    "DetValidationData",
    "DetectConfig",
    "DetectModelSection",
    "DetectionStep",
    "build_detector",
    "run_detection",
    "validate",
]
