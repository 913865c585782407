"""Building a linear-probe run (``evamim linprobe``) for the task runner, and its ``--dry-run`` report: the frozen
backbone, the features (extracted once, or computed per batch), the grid of heads, the data, the evaluation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evamim.config import ConfigError
from evamim.features.choices import FeatureRequest, feature_dim
from evamim.features.extract import FeatureSet
from evamim.features.pipeline import backbone_for_features, features_for, resolve_cache_dir, train_val_features
from evamim.features.val_data import val_data_config
from evamim.tasks.probe_heads import FeatureTable, ProbeHeads, build_grid, make_heads, probe_param_groups, save_head
from evamim.tasks.probe_train import (
    BackboneFeatures,
    ProbeEvaluation,
    ProbeStep,
    ResetDivergedHeads,
    RowBatches,
    broadcast_feature_set,
)
from evamim.tasks.common import backbone_config
from evamim.tasks.runner import RunContext, TrainingParts

if TYPE_CHECKING:
    from evamim.tasks.linear_probe import LinearProbeConfig

logger = logging.getLogger(__name__)


@dataclass
class BuiltProbe:
    parts: TrainingParts
    evaluation: ProbeEvaluation
    facts: dict[str, Any]
    """Entries of ``summary.json``: row counts, classes, cache status."""


def build_probe(config: LinearProbeConfig, context: RunContext) -> BuiltProbe:
    """Every process: the backbone, the features (extraction and the cache are collectives; the main process's
    rows are then handed to every process), the heads (BatchNorm over the global batch with several
    processes), the data, the step and the evaluation of this process's share of the validation rows."""
    device = context.device
    backbone, request, dtype = _backbone(config, device)
    train, val, loader, cache = _features(config, context, backbone, request, dtype)
    num_classes = _num_classes(config, train, val, loader)
    dims = {spec: feature_dim(spec, backbone.embed_dim) for spec in config.features}
    heads = make_heads(build_grid(config.features, config.probe.lrs, config.probe.weight_decays), dims, num_classes,
                       config.seed, device)
    if context.world_size > 1:
        from evamim.engine.sync_batchnorm import convert_batchnorm

        heads = convert_batchnorm(heads, device)
    if loader is not None:
        data: Any = loader
        step = ProbeStep(heads, device, BackboneFeatures(backbone, request, config.features, device, dtype))
    else:
        table = FeatureTable.from_set(train, config.features, device, preload=config.probe.preload)
        try:
            data = RowBatches(table, train.labels, context.batch_size, seed=config.seed, rank=context.rank,
                              world_size=context.world_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        step = ProbeStep(heads, device)
    val_rows = torch.arange(context.rank, len(val), context.world_size)  # unpadded: every row scored once
    evaluation = ProbeEvaluation(heads, FeatureTable.from_set(val, config.features, device), val.labels, val_rows)
    steps_per_epoch = len(data)
    if steps_per_epoch < 1:  # augmented mode (cached rows were checked by RowBatches)
        raise ConfigError(f"the training images are fewer than one step's {context.batch_size} per process: lower "
                          "probe.batch_size")
    loop_updates = {"log_every": steps_per_epoch}  # one line per epoch: the epoch's mean loss of every head
    if config.probe.eval_every:
        loop_updates["eval_every"] = config.probe.eval_every * steps_per_epoch
    logger.info("linear probe: %d heads, %d classes, %s mode, %d steps per epoch", len(heads.grid), num_classes,
                "augmented" if loader is not None else "precomputed", steps_per_epoch)

    def export(full: nn.Module, out: Path) -> dict[str, Any]:
        return {"best_head_file": str(save_head(full, evaluation.best, out / "best_head.safetensors"))}

    parts = TrainingParts(
        model=heads,
        step=step,
        data=data,
        param_groups=probe_param_groups(heads),
        # Buffers never differ between processes: the BatchNorm statistics are the global batch's and the
        # diverged flags are agreed on in every step.
        sync_buffers=False,
        evaluation=evaluation,
        hooks=[ResetDivergedHeads(heads)],
        loop_updates=loop_updates,
        export=export,
    )
    facts = {"num_train": None if train is None else len(train), "num_val": len(val), "num_classes": num_classes,
             "cache": cache, "features": list(config.features)}
    return BuiltProbe(parts, evaluation, facts)


def _features(config: LinearProbeConfig, context: RunContext, backbone: nn.Module, request: FeatureRequest,
              dtype: torch.dtype) -> tuple[FeatureSet | None, FeatureSet, Any, dict[str, str]]:
    """``(training rows or None, validation rows, the augmented training loader or None, cache status)``, the
    rows on every process."""
    cache_dir = resolve_cache_dir(config.cache, config.cache_dir, config.output_dir)
    extract = dict(device=context.device, dtype=dtype, batch_size=config.extract_batch_size, cache_dir=cache_dir,
                   progress=config.progress and context.is_main_process)
    if not config.probe.augment:
        train, val, cache = train_val_features(backbone, config.data, config.val_data, request, **extract)
        return broadcast_feature_set(train), broadcast_feature_set(val), None, cache
    try:
        from evamim.data.loader import build_loader

        loader = build_loader(config.data, batch_size=context.batch_size, purpose="finetune")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data: {error}") from None
    val, status = features_for(backbone, val_data_config(config.data, config.val_data), request, tag="val", **extract)
    return None, broadcast_feature_set(val), loader, {"val": status}


def _backbone(config: LinearProbeConfig, device: torch.device) -> tuple[nn.Module, FeatureRequest, torch.dtype]:
    return backbone_for_features(config, device)


def _num_classes(config: LinearProbeConfig, train: FeatureSet | None, val: FeatureSet, loader: Any) -> int:
    """``num_classes``, else 1 + the largest label seen (in augmented mode also the training source's classes);
    the same on every process (every process holds the labels)."""
    seen = 1 + max(int(s.labels.max()) for s in (train, val) if s is not None and len(s))
    if loader is not None:
        source = getattr(loader.dataset, "source", None)
        if source is None and config.num_classes is None:
            raise ConfigError("probe.augment with shards: the training labels are not known before they are read; "
                              "set num_classes")
        if getattr(source, "classes", None):
            seen = max(seen, len(source.classes))
        elif getattr(source, "entries", None):
            seen = max(seen, 1 + max(entry.label for entry in source.entries))
    if config.num_classes is None:
        return seen
    if config.num_classes < seen:
        raise ConfigError(f"num_classes={config.num_classes} but the labels go up to {seen - 1}: set "
                          f"num_classes={seen} or null")
    return config.num_classes


# ----------------------------------------------------------------------------------------------- --dry-run
def describe_probe(config: LinearProbeConfig) -> str:
    """The ``--dry-run`` report of a validated config."""
    from evamim.models.vit import EvaViT
    from evamim.tasks.plan import count_samples, describe_run

    try:
        vit = backbone_config(config.model)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"model: {error}") from None
    probe = config.probe
    classes, origin = _dry_run_classes(config)
    dims = {spec: feature_dim(spec, vit.embed_dim) for spec in config.features}
    grid = build_grid(config.features, probe.lrs, probe.weight_decays)
    with torch.device("meta"):
        backbone = EvaViT(vit).requires_grad_(False)
        heads = ProbeHeads(grid, dims, classes or 1)
    mode = ("augmented: every batch through the fine-tuning transform and the backbone" if probe.augment else
            f"precomputed: features extracted once ({config.extract_batch_size} images per forward), cached in "
            f"{resolve_cache_dir(config.cache, config.cache_dir, config.output_dir) or 'nothing (cache=false)'}")
    lines = [
        f"backbone (frozen): {config.model.name or config.model.pretrained}, {vit.depth} blocks of width "
        f"{vit.embed_dim}, {config.data.image_size} px; autocast {config.precision}",
        f"mode: {mode}",
        f"grid: {len(grid)} heads = features {list(config.features)} x lrs {list(probe.lrs)} x weight decays "
        f"{list(probe.weight_decays)}; feature widths {dims}",
        f"classes: {classes} ({origin})" if classes else f"classes: {origin} (head sizes below are for 1 class)",
        f"learning rates: each head's probe.lrs value times the schedule factor below ({probe.optimizer}, warmup "
        f"to 1, cosine to probe.min_lr_scale={probe.min_lr_scale:g}); weight decay per head",
        f"validation: {config.val_data.path or f'{config.val_data.holdout:g} of data held out'}",
    ]
    dataset = None
    if config.val_data.holdout:
        total, origin = count_samples(config.data)
        if total is not None:  # the holdout rounds per class: close to this
            total, origin = total - round(config.val_data.holdout * total), f"about, {origin} less the holdout"
        dataset = (total, origin)
    return describe_run(config, {"heads": heads, "backbone": backbone}, lines, dataset=dataset)


def _dry_run_classes(config: LinearProbeConfig) -> tuple[int | None, str]:
    if config.num_classes is not None:
        return config.num_classes, "num_classes"
    try:
        kind = config.data.resolve_source()
    except (ValueError, FileNotFoundError) as error:
        return None, str(error)
    if kind == "synthetic":
        from evamim.data.synthetic import SyntheticShapes

        return len(SyntheticShapes.classes), "synthetic shapes"
    if kind == "folder" and os.path.isdir(config.data.path):
        folders = [e for e in os.scandir(config.data.path) if e.is_dir() and not e.name.startswith(".")]
        return len(folders), f"class folders of {config.data.path}"
    return None, "unknown until the labels are read"
