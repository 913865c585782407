"""``evamim finetune``: full fine-tuning of a pre-trained EvaViT for image classification.

config -> the backbone (pre-trained weights; pos_embed resampled when ``data.image_size`` differs from the
checkpoint's, e.g. 224 -> 336) with EVA's classifier (mean-pool of the patch tokens -> ``fc_norm`` -> ``head``
initialised at 0.001 scale) and drop path -> AdamW with layer-wise lr decay -> the shared training loop, with
RandAugment / random erasing in the loader, mixup / cutmix on the batch, a soft-target cross entropy (label
smoothing folded into the targets), an EMA of the weights, and an evaluation of the model and its EMA on the
validation set every epoch. The best model and the best EMA (by top-1) are exported as evamim model directories.

Runs on the task runner (``evamim.tasks.runner``): one process or many (``torchrun``, ``srun``; ddp, zero1 or
fsdp), with checkpoints and exact resume. Output directory: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/``, ``model/`` and ``model_ema/`` (the final weights), ``best/`` and ``best_ema/`` (each with
``metrics.json``), ``summary.json``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from evamim.config import ConfigError
from evamim.data.config import DataConfig
from evamim.engine import CheckpointConfig, LoopConfig, OptimConfig
from evamim.engine.distributed import DistributedConfig
from evamim.engine.ema import EmaConfig, ModelEma
from evamim.tasks.classification import (
    BestCheckpoints,
    ClassificationStep,
    ClassifierEvaluation,
    results_table,
    soft_target_cross_entropy,
    summarize_evaluations,
)
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import (
    TrainedModelSection,
    ValidationData,
    backbone_config,
    load_backbone,
    model_problems,
    source_classes,
    training_run_problems,
)
from evamim.tasks.runner import RunContext, TrainingParts, run_training

logger = logging.getLogger(__name__)

GLOBAL_POOLS = ("avg", "token")
# EvaViTConfig fields this task sets from its own keys; setting them in model.options too would be ambiguous.
TASK_OWNED_OPTIONS = {
    "num_classes": "head.num_classes",
    "global_pool": "head.global_pool",
    "head_init_scale": "head.init_scale",
    "drop_path_rate": "model.drop_path_rate",
    "grad_checkpointing": "model.grad_checkpointing",
    "img_size": "data.image_size",
    "mim_head_dim": None,
    "use_mask_token": None,
}


@dataclass
class HeadSection:
    """The classifier on top of the backbone."""

    num_classes: int | None = None
    """Classes of the task; None = the number of classes of the training data (folder / synthetic sources)."""
    global_pool: str = "avg"
    """``avg``: mean of the patch tokens -> fc_norm -> head (EVA); ``token``: cls token after the final norm."""
    init_scale: float = 0.001
    """The head's weights and bias are multiplied by this after init (EVA / BEiT: 0.001)."""


@dataclass
class EvalSection:
    """Evaluation on ``val_data``, of the model and (with ``ema.enabled``) of its EMA."""

    enabled: bool = True
    """Requires ``val_data.path``: evaluating on the training set by accident would be worse than an error."""
    batch_size: int | None = None
    """Images per evaluation batch (per process); None = the training micro-batch."""
    every_epochs: float = 1.0
    """Evaluate every this many epochs (and at the end), unless ``loop.eval_every`` (steps) is set."""


@dataclass
class FinetuneConfig:
    """Defaults: a ViT-B/16 IN-1K recipe (BEiT / MAE style); the recipes (``evamim list recipes``) hold the deltas."""

    model: TrainedModelSection = field(default_factory=TrainedModelSection)
    head: HeadSection = field(default_factory=HeadSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(labels=True, mixup_alpha=0.8, cutmix_alpha=1.0))
    val_data: ValidationData = field(default_factory=ValidationData)
    """The validation images (same settings as ``data``), e.g. ``val_data.path=/data/imagenet/val``."""
    eval: EvalSection = field(default_factory=EvalSection)
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(enabled=True, decay=0.9999))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=5e-4, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
            layer_decay=0.65, clip_grad=None,
        )
    )
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=100))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes share the model (docs/multi-node.md)."""
    batch_size: int = 128
    """Images per process and optimizer step; with ``global_batch_size`` set: per forward (see tasks/batching.py)."""
    global_batch_size: int | None = None
    """Images per optimizer step over all processes (the accumulation is derived); None = ``batch_size`` x processes."""
    output_dir: str = "runs/finetune"
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------------- validation
def model_overrides(config: FinetuneConfig, num_classes: int) -> dict[str, Any]:
    """The EvaViTConfig fields this task sets on top of ``model.options``."""
    return {
        "img_size": config.data.image_size,
        "num_classes": num_classes,
        "global_pool": config.head.global_pool,
        "head_init_scale": config.head.init_scale,
        "drop_path_rate": config.model.drop_path_rate,
        "grad_checkpointing": config.model.grad_checkpointing,
        "mim_head_dim": None,  # the MIM head and mask token of a pre-training checkpoint are not used here
        "use_mask_token": False,
    }


def model_config_of(config: FinetuneConfig, num_classes: int):
    """The classifier's EvaViTConfig, without weights (a ValueError / FileNotFoundError says what is wrong)."""
    return backbone_config(config.model, model_overrides(config, num_classes))


def validate(config: FinetuneConfig) -> None:
    """Raise ConfigError for anything that would fail later, before any data or model is built."""
    problems = model_problems(config.model, TASK_OWNED_OPTIONS)
    if config.head.global_pool not in GLOBAL_POOLS:
        problems.append(f"head.global_pool must be one of {GLOBAL_POOLS}, got {config.head.global_pool!r}")
    if config.head.num_classes is not None and config.head.num_classes < 1:
        problems.append(f"head.num_classes must be >= 1 or null, got {config.head.num_classes}")
    if not config.data.labels:
        problems.append("fine-tuning needs class labels: set data.labels=true")
    problems += training_run_problems(config)
    if not problems and uses_mixup(config.data):
        from evamim.tasks.batching import batch_plan, launch_world_size

        micro = batch_plan(config, launch_world_size()).micro_batch
        if micro % 2:
            problems.append(f"mixup/cutmix pair the images of a micro-batch, so it must be even: it is {micro} "
                            "(batch_size / loop.grad_accum_steps, or batch_size with global_batch_size)")
    if config.eval.enabled:
        problems += _eval_problems(config)
    if not problems:
        try:
            model_config_of(config, config.head.num_classes or 1)
        except (ValueError, FileNotFoundError) as error:
            problems.append(f"model: {error}")
    if problems:
        raise ConfigError("invalid fine-tuning config:\n  " + "\n  ".join(problems))


def _eval_problems(config: FinetuneConfig) -> list[str]:
    problems = []
    if not config.val_data.given:
        problems.append(
            "no validation set, so the evaluation would have to use the training set: point val_data.path at the "
            "validation images, e.g. val_data.path=/data/imagenet/val (or val_data.source=synthetic for a synthetic "
            "run), or set eval.enabled=false")
    problems += config.val_data.problems(config.data)
    if config.eval.every_epochs <= 0:
        problems.append(f"eval.every_epochs must be > 0, got {config.eval.every_epochs}")
    if config.eval.batch_size is not None and config.eval.batch_size < 1:
        problems.append(f"eval.batch_size must be >= 1 or null, got {config.eval.batch_size}")
    return problems


def uses_mixup(data: DataConfig) -> bool:
    return data.mixup_alpha > 0 or data.cutmix_alpha > 0


# ---------------------------------------------------------------------------------------------- the task
def build_model(config: FinetuneConfig, num_classes: int) -> nn.Module:
    """The EvaViT classifier at ``data.image_size``, with the pre-trained weights loaded (pos_embed resampled
    when the checkpoint was trained at another resolution; a head of another size is left at its init)."""
    return load_backbone(config.model, **model_overrides(config, num_classes))


def data_classes(loader) -> int | None:
    """Number of classes of a map-style training source (folder, synthetic), None when unknown (shards, lists)."""
    classes = source_classes(loader)
    return len(classes) if classes else None


def resolve_num_classes(config: FinetuneConfig, loader) -> int:
    found = data_classes(loader)
    wanted = config.head.num_classes
    if wanted is None:
        if found is None:
            raise ConfigError(f"cannot tell the number of classes of data.source={config.data.source}: "
                              "set head.num_classes")
        return found
    if found is not None and found != wanted:
        raise ConfigError(f"head.num_classes={wanted} but the training data has {found} classes; "
                          f"set head.num_classes={found}")
    return wanted


class FinetuneTask:
    """Fine-tuning for the runner: the classifier is trained and wrapped; EMA and best-model export are hooks."""

    name = "finetune"

    def validate(self, config: FinetuneConfig) -> None:
        validate(config)

    def build(self, config: FinetuneConfig, context: RunContext) -> TrainingParts:
        from evamim.data.loader import build_loader
        from evamim.data.mixup import build_mixup

        try:
            loader = build_loader(config.data, batch_size=context.batch_size, purpose="finetune")
            val_loader = None
            if config.eval.enabled:
                val_loader = build_loader(config.val_data.data_config(config.data), purpose="eval",
                                          batch_size=config.eval.batch_size or context.batch_size // context.grad_accum_steps)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data: {error}") from None
        num_classes = resolve_num_classes(config, loader)
        model = build_model(config, num_classes).to(context.device)
        logger.info("fine-tuning at %d px, %d classes", config.data.image_size, num_classes)
        ema = ModelEma(model, config.ema.decay) if config.ema.enabled else None
        evaluation = ClassifierEvaluation(val_loader, context.device, ema) if val_loader is not None else None
        best = (BestCheckpoints(context.output_dir, ema, is_main_process=context.is_main_process)
                if evaluation is not None else None)
        loop_updates = {}
        if evaluation is not None and not config.loop.eval_every:  # derived; the config itself is unchanged
            loop_updates["eval_every"] = max(1, round(config.eval.every_epochs * len(loader)))
        self.num_classes, self.ema, self.best = num_classes, ema, best

        def export(full: nn.Module, out: Path) -> dict[str, Any]:
            from evamim.models.checkpoint import save_pretrained

            model_dir = save_pretrained(full, out / "model")
            ema_dir = save_pretrained(ema.module, out / "model_ema") if ema is not None else None
            return {"model_dir": str(model_dir), "ema_dir": str(ema_dir) if ema_dir else None}

        return TrainingParts(
            model=model,
            step=ClassificationStep(num_classes, config.data.label_smoothing, build_mixup(config.data, num_classes),
                                    context.device),
            data=loader,
            shard_units=model.blocks,
            evaluation=evaluation,
            hooks=[hook for hook in (ema, best) if hook is not None],
            loop_updates=loop_updates,
            export=export,
        )

    def results(self, config: FinetuneConfig, result: Any, parts: TrainingParts) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "image_size": config.data.image_size,
                **summarize_evaluations(self.best, with_ema=self.ema is not None)}


def run_finetune(config: FinetuneConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Fine-tune and write the output directory (see the module docstring); returns the summary.

    Re-running with the same output_dir resumes from the newest checkpoint. ``hooks`` are extra loop hooks.
    """
    return run_training(FinetuneTask(), config, hooks)


def dry_run(config: FinetuneConfig) -> str:
    """``evamim finetune --dry-run``: the plan, with the classifier built on the meta device."""
    import torch

    from evamim.models.vit import EvaViT
    from evamim.tasks.plan import describe_run

    validate(config)
    classes = config.head.num_classes or 1
    with torch.device("meta"):
        model = EvaViT(model_config_of(config, classes))
    classes = (f"{config.head.num_classes} classes" if config.head.num_classes
               else "classes from the training data (counted with a 1-class head)")
    validation = config.val_data.path or f"{config.val_data.source} images" if config.eval.enabled else "off"
    lines = [f"classifier at {config.data.image_size} px ({model.config.grid_size[0]}x{model.config.grid_size[1]} "
             f"patches), {classes}, {config.head.global_pool} pooling; weights from "
             f"{config.model.pretrained or 'random init'}",
             f"validation: {validation}"]
    return describe_run(config, {"model": model}, lines)


# ---------------------------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None, "model.pretrained=runs/pretrain/model data.path=/data/in1k/train "
                                                 "val_data.path=/data/in1k/val")


def run(args: argparse.Namespace) -> int:
    code, config, summary, rank = run_config_command("finetune", FinetuneConfig, run_finetune, args, dry_run_fn=dry_run)
    if code == 0 and rank == 0:
        print(f"summary: {Path(config.output_dir) / 'summary.json'}")
        print(results_table(summary))
    return code


__all__ = [
    "BestCheckpoints",
    "ClassificationStep",
    "ClassifierEvaluation",
    "EvalSection",
    "FinetuneConfig",
    "FinetuneTask",
    "HeadSection",
    "build_model",
    "run_finetune",
    "soft_target_cross_entropy",
    "validate",
]
