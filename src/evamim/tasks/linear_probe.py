"""``evamim linprobe``: linear probe of a frozen backbone, a grid of heads trained at once.

Protocol (MAE / EVA): head = ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, classes)``
(weight trunc-normal std 0.01, bias 0) on frozen features; cross-entropy; LARS (momentum 0.9, no
weight decay), linear warmup then a per-step cosine to 0; 90 epochs; top-1/top-5 on the validation
set with the BatchNorm in eval mode (running statistics). EVA reports its EVA-CLIP probe with the cls
token, batch 16384 and lr 1.0.

The grid: every (feature choice, lr, weight decay) combination is one head. All heads see the same
batches from the same backbone forward (or the same cached rows) and sit in one module, one optimizer
param group per head weight and bias carrying that head's lr and weight decay; the loss is the sum of the
heads' losses and gradients do not mix because the heads share no parameter. A head whose loss becomes
non-finite leaves training and is reported as diverged; the others go on. The best head is the one with the
highest final top-1 on the validation set (what DINO's and MAE's grids do too; report it as such).

Modes:
- precomputed (``probe.augment=false``, the default): features of the training set are extracted once
  with the evaluation transform (and cached), handed to every process, and the heads train on those rows
  (a seeded permutation per epoch).
- augmented (``probe.augment=true``): every training batch runs through the fine-tuning transform
  (``data.finetune_crop_scale`` RandomResizedCrop + flip; RandAugment and random erasing are off unless
  set) and the frozen backbone, as MAE and DINO train their probes.

Runs on the task runner (``evamim.tasks.runner``): one process or many (``torchrun``, ``srun``; ddp or zero1),
with checkpoints, exact resume (re-running the same command continues), ``metrics.jsonl`` and ``summary.json``.
The trained module is the grid of heads; the frozen backbone lives inside the step and is never wrapped. With
several processes each takes its share of every global batch and the heads' BatchNorm normalises over the
global batch, so the result does not depend on the number of processes.

The config: ``probe.*`` is the one place where the protocol is set, and the runner's sections are derived from
it as read-only properties, never stored: ``optim`` (``probe.optimizer``; the schedule is a factor, warmup from
0 to 1 then a cosine to ``probe.min_lr_scale``, that each head's group multiplies by its own lr; momentum, trust
coefficient; no clipping; each head's weight decay stays as its group sets it), ``loop`` (``probe.epochs``;
heads in fp32; one log line per epoch and an evaluation every ``probe.eval_every`` epochs, set once the epoch
length is known), ``batch_size`` / ``global_batch_size`` (``probe.batch_size`` / ``probe.global_batch_size``).
Exposing ``optim.*`` and ``loop.*`` instead would offer keys that mean nothing for a grid (one lr, one weight
decay, layer decay, clipping, precision) beside the probe's own. What the probe has no key for is exposed as
for every training task: ``checkpoint.*`` and ``distributed.*``. So ``--print-config`` and
``output_dir/config.yaml`` hold everything that decides the run, and ``--dry-run`` prints the schedule it makes.

Output directory: ``config.yaml``, ``metrics.jsonl`` (the summed and per-head losses, per-head validation
scores), ``checkpoints/``, ``best_head.safetensors``, ``summary.json`` (per-head rows, the best head).
Learning rates are used as given (no batch-size rescaling): MAE's base lr 0.1 at batch 16384 is 6.4.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim.config import ConfigError
from evamim.data.config import DataConfig
from evamim.engine import CheckpointConfig, LoopConfig, OptimConfig
from evamim.engine.distributed import DistributedConfig
from evamim.features.choices import check_features
from evamim.features.pipeline import check_model_and_data
from evamim.features.val_data import ValDataSection, class_problems
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import ModelSection, format_table, output_dirs_problems
from evamim.tasks.probe_heads import (
    FeatureTable,
    HeadSpec,
    ProbeHead,
    ProbeHeads,
    build_grid,
    make_heads,
    probe_optim_config,
    probe_optimizer,
    probe_param_groups,
    save_head,
    summarize,
)
from evamim.tasks.probe_train import ProbeEvaluation, ProbeStep, RowBatches, evaluate, fit_heads
from evamim.tasks.runner import run_training

logger = logging.getLogger(__name__)

PROBE_OPTIMIZERS = ("lars", "sgd", "adamw")


@dataclass
class ProbeSection:
    """How the heads are trained."""

    optimizer: str = "lars"
    """``lars`` (MAE/EVA), ``sgd`` or ``adamw``."""
    lrs: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0])
    """Peak learning rates of the grid, used as given (EVA: 1.0 at batch 16384)."""
    weight_decays: list[float] = field(default_factory=lambda: [0.0])
    """Weight decays of the grid (on the Linear weight; the bias is never decayed)."""
    epochs: int = 90
    warmup_epochs: float = 10.0
    min_lr_scale: float = 0.0
    """The cosine ends at this fraction of each head's peak lr."""
    batch_size: int = 16384
    """Rows per process and optimizer step (MAE/EVA: 16384 in all); with ``global_batch_size`` set, rows per
    forward. An epoch drops its last incomplete step."""
    global_batch_size: int | None = None
    """Rows per optimizer step over all processes (the accumulation is derived, see tasks/batching.py); None =
    ``batch_size`` x processes."""
    momentum: float = 0.9
    """LARS and SGD momentum."""
    trust_coefficient: float = 0.001
    """LARS: each weight's step is ``eta * |w| / |g + wd w|`` times the lr."""
    augment: bool = False
    """Run every training batch through the fine-tuning transform and the backbone (slower; MAE/EVA's protocol)."""
    eval_every: int = 0
    """Also evaluate every this many epochs (logged to metrics.jsonl); 0 = only at the end."""
    preload: bool = True
    """Precomputed mode: keep the training features on the device (off: move each batch from host memory)."""


@dataclass
class LinearProbeConfig:
    """``evamim linprobe``; defaults follow MAE/EVA's probe (cls token, LARS, 90 epochs, batch 16384)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(labels=True, auto_augment=None, random_erasing=0.0))
    """The training set and its transforms (``data.path``, ``data.image_size``, ``data.crop_pct``, ...)."""
    val_data: ValDataSection = field(default_factory=ValDataSection)
    features: list[str] = field(default_factory=lambda: ["cls"])
    """Feature choices of the grid: cls, avg, cls+avg, lastN, last4+avg, ... (one head per choice and lr)."""
    probe: ProbeSection = field(default_factory=ProbeSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """How several processes share the heads: ddp or zero1 (docs/multi-node.md)."""
    extract_batch_size: int = 256
    """Images per backbone forward when extracting features (per process)."""
    cache: bool = True
    cache_dir: str | None = None
    """Where cached features go; None = ``<output_dir>/features``. Share it between runs and with ``evamim knn``."""
    output_dir: str = "runs/linprobe"
    device: str = "auto"
    precision: str = "auto"
    """Autocast dtype of the backbone: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16. The heads run in fp32."""
    num_classes: int | None = None
    """None = 1 + the largest label seen (augmented mode on shards: set it, the training labels are not known
    up front)."""
    seed: int = 0
    """Seeds head initialisation, batch order, a random backbone and the holdout split."""
    progress: bool = True

    # The runner's view, derived from probe.* (see the module docstring); properties are not config keys.
    @property
    def batch_size(self) -> int:
        return self.probe.batch_size

    @property
    def global_batch_size(self) -> int | None:
        return self.probe.global_batch_size

    @property
    def optim(self) -> OptimConfig:
        return probe_optim_config(self.probe)

    @property
    def loop(self) -> LoopConfig:
        return LoopConfig(epochs=self.probe.epochs, precision="fp32", progress_bar=self.progress, tensorboard=False)


# ------------------------------------------------------------------------------------------- validation
def probe_problems(probe: ProbeSection, world_size: int) -> list[str]:
    """What is wrong with ``probe.*`` on ``world_size`` processes (messages name the keys)."""
    problems = []
    if probe.optimizer not in PROBE_OPTIMIZERS:
        problems.append(f"probe.optimizer must be one of {', '.join(PROBE_OPTIMIZERS)}, got {probe.optimizer!r}")
    if not probe.lrs or min(probe.lrs) <= 0:
        problems.append(f"probe.lrs must be a non-empty list of positive learning rates, got {list(probe.lrs)}")
    if not probe.weight_decays or min(probe.weight_decays) < 0:
        problems.append(f"probe.weight_decays must be a non-empty list of values >= 0, got {list(probe.weight_decays)}")
    if probe.epochs < 1:
        problems.append(f"probe.epochs must be >= 1, got {probe.epochs}")
    if not 0 <= probe.warmup_epochs <= probe.epochs:
        problems.append(f"probe.warmup_epochs must be in [0, probe.epochs={probe.epochs}], got {probe.warmup_epochs}")
    if not probe.min_lr_scale >= 0:
        problems.append(f"probe.min_lr_scale must be >= 0, got {probe.min_lr_scale}")
    if not 0 <= probe.momentum < 1:
        problems.append(f"probe.momentum must be in [0, 1), got {probe.momentum}")
    if not probe.trust_coefficient > 0:
        problems.append(f"probe.trust_coefficient must be > 0, got {probe.trust_coefficient}")
    if probe.eval_every < 0:
        problems.append(f"probe.eval_every must be >= 0 (0 = only at the end), got {probe.eval_every}")
    if probe.batch_size < 2:
        problems.append(f"probe.batch_size must be >= 2 (BatchNorm needs two rows), got {probe.batch_size}")
    elif probe.global_batch_size is not None:
        wanted, per_forward = probe.global_batch_size, probe.batch_size * world_size
        if wanted < 1 or wanted % per_forward:
            fixed = max(1, round(wanted / per_forward)) * per_forward
            problems.append(f"probe.global_batch_size {wanted} is not a multiple of probe.batch_size "
                            f"{probe.batch_size} x {world_size} process(es) = {per_forward}: choose "
                            f"probe.global_batch_size={fixed} or another probe.batch_size")
    return problems


def run_problems(config: LinearProbeConfig) -> list[str]:
    """``distributed.*``, ``checkpoint.resume`` and the directories the run writes."""
    problems = config.distributed.problems()
    if config.distributed.strategy == "fsdp":
        problems.append("distributed.strategy=fsdp is not available for linprobe: the heads are small enough to "
                        "hold on every process; use ddp or zero1")
    resume = config.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).exists():
        problems.append(f"checkpoint.resume {resume} does not exist: give a checkpoint file, or auto / never")
    return problems + output_dirs_problems(config.output_dir, config.cache_dir if config.cache else None)


def validate(config: LinearProbeConfig) -> None:
    """Raise ConfigError listing everything that would fail later, before any model or data is built."""
    from evamim.tasks.batching import launch_world_size

    problems: list[str] = []
    check_model_and_data(config.model, config.data, config.precision, problems, needs_labels=True)
    problems += config.val_data.check(config.data) or class_problems(config.data, config.val_data)
    check_features(config.features, problems)
    problems += probe_problems(config.probe, launch_world_size())
    if config.probe.augment and config.val_data.holdout:
        problems.append("probe.augment needs a separate validation set: set val_data.path instead of val_data.holdout")
    if config.extract_batch_size < 1:
        problems.append(f"extract_batch_size must be >= 1, got {config.extract_batch_size}")
    if config.num_classes is not None and config.num_classes < 2:
        problems.append(f"num_classes must be >= 2 or null (from the labels), got {config.num_classes}")
    problems += run_problems(config)
    if problems:
        raise ConfigError("invalid linprobe config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------- the task
class LinearProbeTask:
    """The probe for the runner: the grid of heads is trained and wrapped; the backbone stays in the step."""

    name = "linprobe"

    def validate(self, config: LinearProbeConfig) -> None:
        validate(config)

    def build(self, config: LinearProbeConfig, context: Any):
        from evamim.tasks.probe_setup import build_probe

        built = build_probe(config, context)
        self.facts, self.evaluation = built.facts, built.evaluation
        return built.parts

    def results(self, config: LinearProbeConfig, result: Any, parts: Any) -> dict[str, Any]:
        probe = config.probe
        return {
            "protocol": {
                "head": "BatchNorm1d(affine=False, eps=1e-6) + Linear",
                "optimizer": probe.optimizer, "epochs": probe.epochs, "warmup_epochs": probe.warmup_epochs,
                "min_lr_scale": probe.min_lr_scale, "mode": "augmented" if probe.augment else "precomputed",
                "schedule": "warmup + cosine, per step",
            },
            **self.facts,
            "heads": self.evaluation.rows,
            "best": self.evaluation.best,
        }


def run_linear_probe(config: LinearProbeConfig, hooks: tuple = ()) -> dict[str, Any]:
    """Features (cached, or per batch), the grid of heads, results in ``output_dir``; returns the summary.

    Re-running with the same output_dir resumes from the newest checkpoint. ``hooks`` are extra loop hooks."""
    return run_training(LinearProbeTask(), config, hooks)


def dry_run(config: LinearProbeConfig) -> str:
    """``evamim linprobe --dry-run``: the grid, the feature widths and the plan, models on the meta device."""
    from evamim.tasks.probe_setup import describe_probe

    validate(config)
    return describe_probe(config)


# ----------------------------------------------------------------------------------------- from Python
def train_linear_probe(
    train_features: Mapping[str, torch.Tensor],
    train_labels: torch.Tensor,
    val_features: Mapping[str, torch.Tensor],
    val_labels: torch.Tensor,
    probe: ProbeSection | None = None,
    *,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train the grid (every feature name of ``train_features`` x ``probe.lrs`` x ``probe.weight_decays``)
    on given feature tensors {name: (N, D)} and labels (N,) in this process, with the engine's loop; steps of
    ``probe.global_batch_size or probe.batch_size`` rows. Returns ``{"heads": rows, "best": row}``.
    ``output_dir``: where the loop's log and final checkpoint go (None: a temporary directory)."""
    probe = probe or ProbeSection()
    device = torch.device(device)
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    train = FeatureTable.from_tensors(train_features, device, preload=probe.preload)
    val = FeatureTable.from_tensors(val_features, device)
    heads = make_heads(build_grid(list(train_features), probe.lrs, probe.weight_decays), train.dims, num_classes,
                       seed, device)
    fit_heads(heads, RowBatches(train, train_labels, probe.global_batch_size or probe.batch_size, seed=seed), probe,
              out_dir=output_dir)
    evaluation = ProbeEvaluation(heads, val, val_labels, torch.arange(len(val)))
    evaluate(evaluation)
    return {"heads": evaluation.rows, "best": evaluation.best}


# ---------------------------------------------------------------------------------------------- the CLI
def results_table(summary: Mapping[str, Any]) -> str:
    best = summary["best"]
    rows = [{**row, "best": "*" if row["head"] == best["head"] else ""} for row in summary["heads"]]
    return (format_table(rows, ["features", "lr", "weight_decay", "top1", "top5", "diverged", "best"])
            + f"\nbest: {best['head']} top-1 {best['top1']:.2f}% top-5 {best['top5']:.2f}%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "linprobe_in1k",
                         "model.pretrained=runs/pretrain/model data.path=/data/in1k/train val_data.path=/data/in1k/val "
                         "'probe.lrs=[0.3,1,3]' 'features=[cls,last4+avg]'")


def run(args: argparse.Namespace) -> int:
    code, config, summary, rank = run_config_command("linprobe", LinearProbeConfig, run_linear_probe, args,
                                                     dry_run_fn=dry_run)
    if code == 0 and rank == 0:
        print(results_table(summary))
        print(f"summary: {Path(config.output_dir) / 'summary.json'}")
    return code


# The heads, their tables and files live in evamim.tasks.probe_heads, their training in probe_train; they
# stay importable from here.
__all__ = [
    "PROBE_OPTIMIZERS",
    "FeatureTable",
    "HeadSpec",
    "LinearProbeConfig",
    "LinearProbeTask",
    "ProbeHead",
    "ProbeHeads",
    "ProbeSection",
    "ProbeStep",
    "RowBatches",
    "add_arguments",
    "build_grid",
    "dry_run",
    "fit_heads",
    "make_heads",
    "probe_optimizer",
    "probe_param_groups",
    "run",
    "run_linear_probe",
    "save_head",
    "summarize",
    "train_linear_probe",
    "validate",
]
