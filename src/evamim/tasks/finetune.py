"""``evamim finetune``: full fine-tuning of a pre-trained EvaViT for image classification.

config -> the backbone (pre-trained weights; pos_embed resampled when ``data.image_size`` differs from the
checkpoint's, e.g. 224 -> 336) with EVA's classifier (mean-pool of the patch tokens -> ``fc_norm`` -> ``head``
initialised at 0.001 scale) and drop path -> AdamW with layer-wise lr decay -> the shared training loop, with
RandAugment / random erasing in the loader, mixup / cutmix on the batch, a soft-target cross entropy (label
smoothing folded into the targets), an EMA of the weights, and an evaluation of the model and its EMA on the
validation set every epoch. The best model and the best EMA (by top-1) are exported as evamim model directories.

Output directory: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``model/`` and
``model_ema/`` (the final weights), ``best/`` and ``best_ema/`` (each with ``metrics.json``), ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from evamim.config import ConfigError, save_config, to_dict
from evamim.data.config import DataConfig
from evamim.engine import (
    CheckpointConfig,
    Hook,
    LoopConfig,
    OptimConfig,
    Trainer,
    build_optimizer,
    unwrap_model,
)
from evamim.engine.ema import EmaConfig, ModelEma
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import (
    BackboneSection,
    format_table,
    load_backbone,
    resolve_device,
    single_process_problem,
    topk_accuracy,
    training_run_problems,
    write_results,
)


logger = logging.getLogger(__name__)

GLOBAL_POOLS = ("avg", "token")
# EvaViTConfig fields this task sets from its own keys; setting them in backbone.options too would be ambiguous.
TASK_OWNED_OPTIONS = {
    "num_classes": "head.num_classes",
    "global_pool": "head.global_pool",
    "head_init_scale": "head.init_scale",
    "drop_path_rate": "drop_path_rate",
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
    """Evaluation on a validation set, of the model and (with ``ema.enabled``) of its EMA."""

    enabled: bool = True
    data: dict[str, Any] = field(default_factory=dict)
    """Fields of ``data`` that differ for the validation set, e.g. ``{path: /data/imagenet/val}``; the rest
    (image size, crop_pct, mean/std, ...) is shared. Required when enabled: evaluating on the training set
    by accident would be worse than an error."""
    batch_size: int | None = None
    """Images per evaluation batch; None = ``batch_size``."""
    every_epochs: float = 1.0
    """Evaluate every this many epochs (and at the end), unless ``loop.eval_every`` (steps) is set."""


@dataclass
class FinetuneConfig:
    """Defaults: a ViT-B/16 IN-1K recipe (BEiT / MAE style); configs/finetune/*.yaml hold the deltas."""

    backbone: BackboneSection = field(default_factory=BackboneSection)
    head: HeadSection = field(default_factory=HeadSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(labels=True, mixup_alpha=0.8, cutmix_alpha=1.0))
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
    drop_path_rate: float = 0.1
    """Stochastic depth, linearly spaced over the blocks up to this rate (EVA-g IN-1K: 0.4)."""
    batch_size: int = 128
    """Images per process and optimizer step."""
    output_dir: str = "runs/finetune"
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------------- validation
def eval_data_config(config: FinetuneConfig) -> DataConfig:
    """The validation set's DataConfig: ``data`` with ``eval.data`` applied."""
    values = {f.name: getattr(config.data, f.name) for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(config.eval.data) - set(values))
    if unknown:
        raise ValueError(f"eval.data has unknown keys {unknown}; valid keys are the data.* fields: {sorted(values)}")
    return DataConfig(**{**values, **config.eval.data})


def model_overrides(config: FinetuneConfig, num_classes: int) -> dict[str, Any]:
    """The EvaViTConfig fields this task sets on top of ``backbone.options``."""
    return {
        "img_size": config.data.image_size,
        "num_classes": num_classes,
        "global_pool": config.head.global_pool,
        "head_init_scale": config.head.init_scale,
        "drop_path_rate": config.drop_path_rate,
        "mim_head_dim": None,  # the MIM head and mask token of a pre-training checkpoint are not used here
        "use_mask_token": False,
    }


def _check_model_config(config: FinetuneConfig) -> str | None:
    """Build the EvaViTConfig without weights; returns the problem, if any."""
    from evamim.models.checkpoint import read_config
    from evamim.models.presets import model_config
    from evamim.models.vit import EvaViTConfig

    overrides = {**config.backbone.options, **model_overrides(config, config.head.num_classes or 1)}
    try:
        if config.backbone.name is not None:
            model_config(config.backbone.name, **overrides)
        else:  # the architecture comes from an evamim directory (or .safetensors with its config)
            EvaViTConfig.from_dict({**read_config(config.backbone.pretrained).to_dict(), **overrides})
    except (ValueError, FileNotFoundError) as error:
        return f"backbone: {error}"
    return None


def validate(config: FinetuneConfig) -> None:
    """Raise ConfigError for anything that would fail later, before any data or model is built."""
    launch_problem = single_process_problem("finetune")
    if launch_problem:
        raise ConfigError(launch_problem)
    problems = []
    backbone = config.backbone
    if backbone.pretrained is None and backbone.name is None:
        problems.append("set backbone.pretrained (an evamim model directory or weights file) "
                        "and/or backbone.name (a preset)")
    elif backbone.pretrained is not None and not Path(backbone.pretrained).exists():
        problems.append(f"backbone.pretrained {backbone.pretrained} does not exist: give the pre-trained weights")
    for key, owner in TASK_OWNED_OPTIONS.items():
        if key in backbone.options:
            problems.append(f"backbone.options.{key} is set by this task" + (f": use {owner} instead" if owner else ""))
    img_size = backbone.options.get("img_size")
    if img_size is not None and img_size != config.data.image_size:
        problems.append(
            f"backbone.options.img_size={img_size} but data.image_size={config.data.image_size}: the model is built "
            "at the data's resolution (pos_embed is resampled from the checkpoint's); make them equal"
        )
    if config.head.global_pool not in GLOBAL_POOLS:
        problems.append(f"head.global_pool must be one of {GLOBAL_POOLS}, got {config.head.global_pool!r}")
    if config.head.num_classes is not None and config.head.num_classes < 1:
        problems.append(f"head.num_classes must be >= 1 or null, got {config.head.num_classes}")
    if not config.data.labels:
        problems.append("fine-tuning needs class labels: set data.labels=true")
    if not 0.0 <= config.drop_path_rate < 1.0:
        problems.append(f"drop_path_rate must be in [0, 1), got {config.drop_path_rate}")
    problems += _batch_problems(config)
    if config.eval.enabled:
        problems += _eval_problems(config)
    if not problems:
        problem = _check_model_config(config)
        if problem:
            problems.append(problem)
    problems += training_run_problems(config)
    if problems:
        raise ConfigError("invalid fine-tuning config:\n  " + "\n  ".join(problems))


def _batch_problems(config: FinetuneConfig) -> list[str]:
    problems = []
    accumulation = config.loop.grad_accum_steps
    if config.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {config.batch_size}")
    elif accumulation < 1 or config.batch_size % accumulation:
        problems.append(f"batch_size {config.batch_size} is not divisible by loop.grad_accum_steps {accumulation}")
    elif uses_mixup(config.data) and (config.batch_size // accumulation) % 2:
        problems.append(
            f"mixup/cutmix pair the images of a (micro-)batch, so it must be even: batch_size {config.batch_size} / "
            f"loop.grad_accum_steps {accumulation} = {config.batch_size // accumulation}"
        )
    return problems


def _eval_problems(config: FinetuneConfig) -> list[str]:
    problems = []
    if not config.eval.data:
        problems.append(
            "eval.data is empty, so the validation set would be the training set: point it at the validation "
            "images, e.g. eval.data={path: /data/imagenet/val}, or set eval.enabled=false"
        )
    else:
        try:
            eval_data_config(config)
        except (TypeError, ValueError) as error:
            problems.append(f"eval.data: {error}")
    if config.eval.every_epochs <= 0:
        problems.append(f"eval.every_epochs must be > 0, got {config.eval.every_epochs}")
    if config.eval.batch_size is not None and config.eval.batch_size < 1:
        problems.append(f"eval.batch_size must be >= 1 or null, got {config.eval.batch_size}")
    return problems


def uses_mixup(data: DataConfig) -> bool:
    return data.mixup_alpha > 0 or data.cutmix_alpha > 0


# ---------------------------------------------------------------------------------------------- model
def build_model(config: FinetuneConfig, num_classes: int) -> nn.Module:
    """The EvaViT classifier at ``data.image_size``, with the pre-trained weights loaded (pos_embed resampled
    when the checkpoint was trained at another resolution; a head of another size is left at its init)."""
    return load_backbone(config.backbone, **model_overrides(config, num_classes))


def data_classes(loader) -> int | None:
    """Number of classes of a map-style training source (folder, synthetic), None when unknown (shards, lists)."""
    classes = getattr(getattr(loader.dataset, "source", None), "classes", None)
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


# ------------------------------------------------------------------------------------------------- loss
def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k targets[k] * log_softmax(logits)[k]``, computed in fp32.

    logits (B, K); targets (B, K) probabilities (each row sums to 1: mixup/cutmix mixtures of label-smoothed
    one-hot vectors). Equals ``F.cross_entropy(logits, labels, label_smoothing=s)`` for smoothed one-hot targets.
    """
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassificationStep:
    """The objective as the loop sees it: ``(model, batch) -> {"loss": ...}``.

    batch: ``images`` (B, 3, H, W) and ``labels`` (B,) long. Targets are mixup/cutmix soft targets (drawn on the
    device, per micro-batch) or, without mixing, one-hot targets with label smoothing.
    """

    def __init__(self, num_classes: int, label_smoothing: float, mixup, device: torch.device):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = mixup
        self.device = device

    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) -> (possibly mixed images, (B, K) soft targets)."""
        from evamim.data.mixup import smooth_targets

        if self.mixup is None:
            return images, smooth_targets(labels, self.num_classes, self.label_smoothing)
        mixed = self.mixup({"images": images, "labels": labels})
        return mixed["images"], mixed["targets"]

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        images, targets = self.targets(images, labels)
        return {"loss": soft_target_cross_entropy(model(images), targets)}


class ImagesAndLabels:
    """A loader's batches reduced to ``images`` and ``labels``, keeping its length and resume protocol.

    The loader's bookkeeping entries (``bad_samples`` holds one line per failed file, not per sample) would
    otherwise be taken for per-sample data when the loop infers or splits the batch size; failures are
    already logged and counted by the loader itself.
    """

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            yield {"images": batch["images"], "labels": batch["labels"]}

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_classifiers(models: Mapping[str, nn.Module], loader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross entropy of each model over one pass of ``loader``.

    ``models`` maps a metric prefix to a model in eval mode (e.g. ``{"": model, "ema_": ema}``); every batch is
    decoded once and run through all of them. Returns ``{prefix + "top1"|"top5"|"loss": value}``.
    """
    sums = {prefix: {"top1": 0.0, "top5": 0.0, "loss": 0.0} for prefix in models}
    count = 0
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        size = labels.shape[0]
        count += size
        for prefix, model in models.items():
            logits = model(images).float()
            for key, value in topk_accuracy(logits, labels).items():
                sums[prefix][key] += value * size
            sums[prefix]["loss"] += F.cross_entropy(logits, labels, reduction="sum").item()
    if count == 0:
        raise RuntimeError("the validation data yielded no images")
    return {f"{prefix}{key}": value / count for prefix, values in sums.items() for key, value in values.items()}


class ClassifierEval:
    """The loop's ``eval_fn``: the model and, if given, its EMA (brought up to the current step) on the val set."""

    def __init__(self, loader, device: torch.device, ema: ModelEma | None = None):
        self.loader = loader
        self.device = device
        self.ema = ema

    def __call__(self, model: nn.Module) -> dict[str, float]:
        models = {"": model}
        if self.ema is not None:
            models["ema_"] = self.ema.module
        return evaluate_classifiers(models, self.loader, self.device)


class BestCheckpoints(Hook):
    """After each evaluation: remember the metrics, and export the model (``best/``) and the EMA (``best_ema/``)
    as evamim model directories whenever their top-1 is the best so far. The records survive a resume."""

    def __init__(self, output_dir: Path, ema: ModelEma | None, is_main_process: bool = True):
        self.output_dir = Path(output_dir)
        self.ema = ema
        self.is_main_process = is_main_process
        self.latest: dict[str, Any] = {}
        self.best: dict[str, dict[str, Any]] = {"model": {}, "ema": {}}

    def on_eval(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        epochs = trainer.step / trainer.steps_per_epoch if trainer.steps_per_epoch else None
        self.latest = {"step": trainer.step, "epoch": epochs, **{k: float(v) for k, v in metrics.items()}}
        self._consider("model", "", unwrap_model(trainer.model), metrics, trainer.step, epochs)
        if self.ema is not None:
            self._consider("ema", "ema_", self.ema.module, metrics, trainer.step, epochs)

    def _consider(self, which: str, prefix: str, model: nn.Module, metrics, step: int, epochs) -> None:
        record = {key: float(metrics[prefix + key]) for key in ("top1", "top5", "loss")}
        best = self.best[which]
        if best and record["top1"] <= best["top1"]:
            return
        directory = self.output_dir / ("best" if which == "model" else "best_ema")
        self.best[which] = {**record, "step": step, "epoch": epochs, "dir": str(directory)}
        if self.is_main_process:
            from evamim.models.checkpoint import save_pretrained

            save_pretrained(model, directory)
            (directory / "metrics.json").write_text(json.dumps(self.best[which], indent=2) + "\n")
            logger.info("new best %s top-1 %.2f at step %d -> %s", which, record["top1"], step, directory)

    def state_dict(self) -> dict:
        return {"latest": dict(self.latest), "best": {k: dict(v) for k, v in self.best.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.latest = dict(state["latest"])
        self.best = {k: dict(v) for k, v in state["best"].items()}


# --------------------------------------------------------------------------------------------- the run
def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's global generators: timm's augmentations (crops, RandAugment, erasing) and
    mixup draw from them, so a run is repeatable, and with ``data.num_workers=0`` exactly resumable."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loaders(config: FinetuneConfig):
    """(training loader, validation loader or None); a missing or empty dataset is a ConfigError naming it."""
    from evamim.data.loader import build_loader

    try:
        train_loader = build_loader(config.data, batch_size=config.batch_size, purpose="finetune")
        eval_loader = None
        if config.eval.enabled:
            eval_loader = build_loader(eval_data_config(config), purpose="eval",
                                       batch_size=config.eval.batch_size or config.batch_size)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data: {error}") from None
    return train_loader, eval_loader


def run_finetune(config: FinetuneConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Fine-tune and write the output directory (see the module docstring); returns the results dict.

    Re-running with the same output_dir resumes from the newest checkpoint. ``hooks`` are extra loop hooks.
    """
    from evamim.data.mixup import build_mixup

    validate(config)
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    seed_everything(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")

    train_loader, eval_loader = build_loaders(config)
    num_classes = resolve_num_classes(config, train_loader)
    model = build_model(config, num_classes).to(device)
    logger.info("fine-tuning %.1fM parameters at %d px, %d classes", sum(p.numel() for p in model.parameters()) / 1e6,
                config.data.image_size, num_classes)
    ema = ModelEma(model, config.ema.decay) if config.ema.enabled else None
    eval_fn = ClassifierEval(eval_loader, device, ema) if eval_loader is not None else None
    best = BestCheckpoints(output_dir, ema) if eval_loader is not None else None
    steps_per_epoch = len(train_loader)
    loop = config.loop
    if eval_fn is not None and not loop.eval_every:  # a copy: derived values stay out of the config
        loop = dataclasses.replace(loop, eval_every=max(1, round(config.eval.every_epochs * steps_per_epoch)))
    step_fn = ClassificationStep(num_classes, config.data.label_smoothing, build_mixup(config.data, num_classes), device)
    trainer = Trainer(
        model,
        step_fn,
        ImagesAndLabels(train_loader),
        build_optimizer(model, config.optim),
        optim=config.optim,
        loop=loop,
        checkpoint=config.checkpoint,
        out_dir=output_dir,
        steps_per_epoch=steps_per_epoch,
        hooks=[h for h in (ema, best) if h is not None] + list(hooks),
        eval_fn=eval_fn,
        config=to_dict(config),
    )
    result = trainer.train()
    results = {
        "task": "finetune",
        "steps": result.step,
        "epochs": result.step / steps_per_epoch,
        "num_classes": num_classes,
        "image_size": config.data.image_size,
        "train_loss": result.metrics.get("loss"),
        "nonfinite_skipped": result.nonfinite_skipped,
        "data": result.data_totals,
        **summarize_evaluations(best, with_ema=ema is not None),
        **export_final(model, ema, output_dir),
    }
    write_results(output_dir, config, results)
    return results


def export_final(model: nn.Module, ema: ModelEma | None, output_dir: Path) -> dict[str, str | None]:
    """The final weights as evamim model directories ``model/`` and ``model_ema/``."""
    from evamim.models.checkpoint import save_pretrained

    model_dir = save_pretrained(unwrap_model(model), output_dir / "model")
    ema_dir = save_pretrained(ema.module, output_dir / "model_ema") if ema is not None else None
    return {"model_dir": str(model_dir), "ema_dir": str(ema_dir) if ema_dir else None}


def summarize_evaluations(best: BestCheckpoints | None, with_ema: bool) -> dict[str, Any]:
    """``final`` / ``final_ema`` (the last evaluation) and ``best`` / ``best_ema`` records; None where absent."""
    latest = best.latest if best is not None else {}
    return {
        "final": _pick(latest, ""),
        "final_ema": _pick(latest, "ema_") if with_ema else None,
        "best": (best.best["model"] or None) if best is not None else None,
        "best_ema": (best.best["ema"] or None) if best is not None and with_ema else None,
    }


def _pick(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    """{top1, top5, loss, step} of one model from the latest evaluation record."""
    if not metrics:
        return None
    return {"top1": metrics[prefix + "top1"], "top5": metrics[prefix + "top5"], "loss": metrics[prefix + "loss"],
            "step": metrics["step"]}


def results_table(results: Mapping[str, Any]) -> str:
    """The console summary: top-1 / top-5 / loss of the final and best model and EMA."""
    rows = []
    for name in ("final", "final_ema", "best", "best_ema"):
        record = results.get(name)
        if record:
            rows.append({"weights": name, "top1": record["top1"], "top5": record["top5"], "loss": record["loss"],
                         "step": record["step"]})
    if not rows:
        loss = results.get("train_loss")
        return format_table([{"steps": results["steps"], "train_loss": float("nan") if loss is None else loss}])
    return format_table(rows, ["weights", "top1", "top5", "loss", "step"])


# ---------------------------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/finetune/eva_b16_in1k.yaml",
                         "backbone.pretrained=runs/pretrain/model data.path=/data/in1k/train")


def run(args: argparse.Namespace) -> int:
    code, config, results, _ = run_config_command("finetune", FinetuneConfig, run_finetune, args)
    if code == 0:
        print(f"results: {Path(config.output_dir) / 'results.json'}")
        print(results_table(results))
    return code


__all__ = [
    "BestCheckpoints",
    "ClassificationStep",
    "ClassifierEval",
    "EvalSection",
    "FinetuneConfig",
    "HeadSection",
    "build_model",
    "evaluate_classifiers",
    "run_finetune",
    "soft_target_cross_entropy",
    "validate",
]
