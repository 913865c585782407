"""``evamim linprobe``: linear probe of a frozen backbone, a grid of heads trained at once.

Protocol (MAE / EVA): head = ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, classes)``
(weight trunc-normal std 0.01, bias 0) on frozen features; cross-entropy; LARS (momentum 0.9, no
weight decay), linear warmup then a per-step cosine to 0; 90 epochs; top-1/top-5 on the validation
set with the BatchNorm in eval mode (running statistics). EVA reports its EVA-CLIP probe with the cls
token, batch 16384 and lr 1.0.

The grid: every (feature choice, lr, weight decay) combination is one head. All heads see the same
batches from the same backbone forward (or the same cached rows) and sit in one module, one optimizer
param group per head carrying its own lr; gradients do not mix because the heads share no parameter.
The best head is the one with the highest final top-1 on the validation set. (Choosing it on the
validation set is what DINO's and MAE's grids do too; report it as such.)

Modes:
- precomputed (``probe.augment=false``, the default): features of the training set are extracted once
  with the evaluation transform (and cached), then the heads train on those rows for every epoch.
- augmented (``probe.augment=true``): each epoch runs the backbone over the training set again through
  the fine-tuning transform (``data.finetune_crop_scale`` RandomResizedCrop + flip; RandAugment and
  random erasing are off unless set), as MAE and DINO train their probes. Several processes train the
  heads data-parallel (DDP).

Learning rates are used as given (no batch-size rescaling): MAE's base lr 0.1 at batch 16384 is 6.4.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evamim.config import ConfigError
from evamim.data.config import DataConfig
from evamim.engine import OptimConfig, build_optimizer, lr_at, set_hparams
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import BackboneSection, format_table, output_dirs_problems, topk_accuracy, write_results

from evamim.tasks.runner import evaluation_process
from evamim.tasks.features import (
    FeatureRequest,
    FeatureSet,
    ValDataSection,
    check_backbone_and_data,
    check_features,
    class_problems,
    feature_dim,
    features_for,
    features_from_batches,
    is_main_process,
    prepare_backbone,
    resolve_cache_dir,
    resolve_dtype,
    train_val_features,
    val_data_config,
)

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
    """Rows per step (per process in augmented mode); precomputed mode uses min(batch_size, N) and drops
    the last incomplete batch of each epoch."""
    momentum: float = 0.9
    """LARS and SGD momentum."""
    trust_coefficient: float = 0.001
    """LARS: each weight's step is ``eta * |w| / |g + wd w|`` times the lr."""
    augment: bool = False
    """Recompute the training features every epoch through the fine-tuning transform (slower)."""
    eval_every: int = 0
    """Also evaluate every this many epochs (logged to metrics.jsonl); 0 = only at the end."""
    preload: bool = True
    """Precomputed mode: keep the training features on the device (off: move each batch from host memory)."""


@dataclass
class LinearProbeConfig:
    """``evamim linprobe``; defaults follow MAE/EVA's probe (cls token, LARS, 90 epochs, batch 16384)."""

    backbone: BackboneSection = field(default_factory=BackboneSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(labels=True, auto_augment=None, random_erasing=0.0))
    """The training set and its transforms (``data.path``, ``data.image_size``, ``data.crop_pct``, ...)."""
    val_data: ValDataSection = field(default_factory=ValDataSection)
    features: list[str] = field(default_factory=lambda: ["cls"])
    """Feature choices of the grid: cls, avg, cls+avg, lastN, last4+avg, ... (one head per choice and lr)."""
    probe: ProbeSection = field(default_factory=ProbeSection)
    batch_size: int = 256
    """Images per backbone forward when extracting features (per process)."""
    cache: bool = True
    cache_dir: str | None = None
    """Where cached features go; None = ``<output_dir>/features``. Share it between runs and with ``evamim knn``."""
    output_dir: str = "runs/linprobe"
    device: str = "auto"
    dtype: str = "auto"
    """Autocast dtype of the backbone: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."""
    num_classes: int | None = None
    """None = 1 + the largest label seen (augmented mode with shards: set it, the training labels are unknown up front)."""
    seed: int = 0
    """Seeds head initialisation, batch order, a random backbone and the holdout split."""
    progress: bool = True


def validate(config: LinearProbeConfig) -> None:
    """Raise ConfigError listing everything that would fail later, before any model or data is built."""
    problems: list[str] = []
    check_backbone_and_data(config.backbone, config.data, config.dtype, problems, needs_labels=True)
    problems += config.val_data.check(config.data) or class_problems(config.data, config.val_data)
    check_features(config.features, problems)
    probe = config.probe
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
    if probe.batch_size < 2:
        problems.append(f"probe.batch_size must be >= 2 (BatchNorm needs two rows), got {probe.batch_size}")
    if probe.augment and config.val_data.holdout:
        problems.append("probe.augment needs a separate validation set: set val_data.path instead of val_data.holdout")
    if config.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {config.batch_size}")
    if config.num_classes is not None and config.num_classes < 2:
        problems.append(f"num_classes must be >= 2 or null (from the labels), got {config.num_classes}")
    problems += output_dirs_problems(config.output_dir, config.cache_dir if config.cache else None)
    if problems:
        raise ConfigError("invalid linprobe config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------- the heads
@dataclass(frozen=True)
class HeadSpec:
    """One head of the grid."""

    feature: str
    lr: float
    weight_decay: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.feature}/lr{self.lr:g}/wd{self.weight_decay:g}"


def build_grid(features: Sequence[str], lrs: Sequence[float], weight_decays: Sequence[float] = (0.0,)) -> list[HeadSpec]:
    """Every (feature, lr, weight decay) combination, feature-major."""
    return [HeadSpec(f, float(lr), float(wd)) for f in features for lr in lrs for wd in weight_decays]


class ProbeHead(nn.Module):
    """(B, D) -> (B, classes): ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear`` (MAE/EVA)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        # affine=False: the BatchNorm only standardises the frozen features; all learning is in the Linear.
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


class ProbeHeads(nn.Module):
    """The whole grid: ``forward({feature: (B, D_feature)}) -> [logits (B, classes) per head]``."""

    def __init__(self, grid: Sequence[HeadSpec], dims: Mapping[str, int], num_classes: int):
        super().__init__()
        self.grid = list(grid)
        self.heads = nn.ModuleList(ProbeHead(dims[spec.feature], num_classes) for spec in self.grid)

    def forward(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [head(features[spec.feature]) for spec, head in zip(self.grid, self.heads)]


def probe_optimizer(heads: ProbeHeads, probe: ProbeSection) -> torch.optim.Optimizer:
    """One optimizer over all heads; each head's lr is its group's ``lr_scale`` times the schedule factor."""
    groups = []
    for spec, head in zip(heads.grid, heads.heads):
        groups.append({"params": [head.linear.weight], "lr_scale": spec.lr, "weight_decay": spec.weight_decay, "wd_scale": 1.0})
        groups.append({"params": [head.linear.bias], "lr_scale": spec.lr, "weight_decay": 0.0, "wd_scale": 0.0})
    settings = OptimConfig(name=probe.optimizer, lr=1.0, weight_decay=0.0, momentum=probe.momentum,
                           trust_coefficient=probe.trust_coefficient)
    return build_optimizer(heads, settings, groups=groups)


class ProbeTrainer:
    """One step of every head on one batch of features, on the warmup + cosine schedule (``engine.lr_at``)."""

    def __init__(self, heads: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                 min_lr_scale: float = 0.0):
        self.heads = heads
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_scale = min_lr_scale
        self.step_count = 0

    def lr_factor(self) -> float:
        return lr_at(self.step_count, self.total_steps, 1.0, self.min_lr_scale, self.warmup_steps, "cosine")

    def step(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """features {feature: (B, D)}, labels (B,) -> per-head losses (H,), detached."""
        set_hparams(self.optimizer, self.lr_factor())
        self.heads.train()
        losses = torch.stack([F.cross_entropy(logits.float(), labels) for logits in self.heads(features)])
        self.optimizer.zero_grad(set_to_none=True)
        # The heads share no parameter, so the sum gives each head exactly its own loss's gradient.
        losses.sum().backward()
        self.optimizer.step()
        self.step_count += 1
        return losses.detach()


# ------------------------------------------------------------------------------------------ the tables
class FeatureTable:
    """Rows of every feature choice the heads need: ``rows(index (R,)) -> {feature: (R, D)}`` on ``device``."""

    def __init__(self, build: Callable[[torch.Tensor], dict[str, torch.Tensor]], length: int, dims: dict[str, int],
                 device: torch.device, index_device: torch.device):
        self._build = build
        self.length = length
        self.dims = dims
        self.device = device
        self.index_device = index_device

    def __len__(self) -> int:
        return self.length

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        built = self._build(index.to(self.index_device))
        return {name: value.to(self.device, non_blocking=True) for name, value in built.items()}

    @classmethod
    def from_tensors(cls, features: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                     preload: bool = True) -> "FeatureTable":
        """From ``{feature name: (N, D) tensor}`` (any names: the heads' ``feature`` must match them)."""
        device = torch.device(device)
        home = device if preload else torch.device("cpu")
        stored = {name: value.float().to(home) for name, value in features.items()}
        length = {len(v) for v in stored.values()}
        if len(length) != 1:
            raise ValueError(f"feature tensors have different row counts: { {k: len(v) for k, v in stored.items()} }")
        return cls(lambda rows: {name: value[rows] for name, value in stored.items()}, length.pop(),
                   {name: int(value.shape[1]) for name, value in stored.items()}, device, home)

    @classmethod
    def from_set(cls, features: FeatureSet, specs: Sequence[str], device: torch.device | str = "cpu",
                 preload: bool = True) -> "FeatureTable":
        """From a FeatureSet's parts; each choice is assembled per batch (no copy per choice)."""
        device = torch.device(device)
        home = device if preload else torch.device("cpu")
        stored = dataclasses.replace(
            features,
            block_cls=None if features.block_cls is None else features.block_cls.to(home),
            avg=None if features.avg is None else features.avg.to(home),
        )
        specs = list(dict.fromkeys(specs))
        width = (features.block_cls if features.block_cls is not None else features.avg).shape[-1]
        dims = {spec: feature_dim(spec, width) for spec in specs}
        return cls(lambda rows: {spec: stored.get(spec, rows) for spec in specs}, len(features), dims, device, home)


# ------------------------------------------------------------------------------------------ training
@torch.no_grad()
def evaluate_heads(heads: ProbeHeads, table: FeatureTable, labels: torch.Tensor, batch_size: int = 4096) -> list[dict[str, float]]:
    """Top-1/top-5 (percent) of every head on ``table`` with labels (N,); BatchNorm in eval mode."""
    was_training = heads.training
    heads.eval()
    hits = torch.zeros(len(heads.grid), 2, dtype=torch.float64)
    for start in range(0, len(table), batch_size):
        index = torch.arange(start, min(start + batch_size, len(table)))
        target = labels[index].to(table.device)
        for h, logits in enumerate(heads(table.rows(index))):
            scores = topk_accuracy(logits.float(), target)
            hits[h, 0] += scores["top1"] * len(index) / 100
            hits[h, 1] += scores["top5"] * len(index) / 100
    heads.train(was_training)
    total = max(len(table), 1)
    return [{"top1": 100.0 * float(h[0]) / total, "top5": 100.0 * float(h[1]) / total} for h in hits]


def _finite(head: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in head.parameters())


def summarize(heads: ProbeHeads, scores: Sequence[Mapping[str, float]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-head rows (diverged heads marked, their scores NaN) and the best row by top-1."""
    rows = []
    for spec, head, score in zip(heads.grid, heads.heads, scores):
        finite = _finite(head)
        rows.append({
            "head": spec.name, "features": spec.feature, "lr": spec.lr, "weight_decay": spec.weight_decay,
            "top1": score["top1"] if finite else math.nan, "top5": score["top5"] if finite else math.nan,
            "diverged": not finite,
        })
    usable = [row for row in rows if not row["diverged"]]
    if not usable:
        raise RuntimeError("every head diverged (non-finite weights): lower probe.lrs")
    return rows, max(usable, key=lambda row: row["top1"])


def make_heads(grid: Sequence[HeadSpec], dims: Mapping[str, int], num_classes: int, seed: int,
               device: torch.device) -> ProbeHeads:
    """The grid's heads, initialised from ``seed`` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ProbeHeads(grid, dims, num_classes)
    return heads.to(device)


def fit_precomputed(
    heads: ProbeHeads,
    train: FeatureTable,
    train_labels: torch.Tensor,
    probe: ProbeSection,
    *,
    seed: int = 0,
    on_epoch: Callable[[int, int, torch.Tensor], None] | None = None,
) -> ProbeTrainer:
    """Train every head for ``probe.epochs`` epochs over cached rows; batches are a seeded permutation per epoch.

    ``on_epoch(epoch, step, mean per-head loss (H,))`` is called after every epoch.
    """
    if len(train) < 2:
        raise ValueError(f"the training set has {len(train)} rows; a BatchNorm head needs at least 2")
    batch = min(probe.batch_size, len(train))
    steps_per_epoch = len(train) // batch
    trainer = ProbeTrainer(
        heads, probe_optimizer(heads, probe), total_steps=probe.epochs * steps_per_epoch,
        warmup_steps=round(probe.warmup_epochs * steps_per_epoch), min_lr_scale=probe.min_lr_scale,
    )
    labels = train_labels.long().to(train.device)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(probe.epochs):
        order = torch.randperm(len(train), generator=generator)
        total = torch.zeros(len(heads.grid), device=train.device)
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            total += trainer.step(train.rows(index), labels[index.to(labels.device)])
        if on_epoch is not None:
            on_epoch(epoch, trainer.step_count, total / steps_per_epoch)
    return trainer


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
) -> dict[str, Any]:
    """Train the grid (every feature name of ``train_features`` x ``probe.lrs`` x ``probe.weight_decays``)
    on given feature tensors {name: (N, D)} and labels (N,); return ``{"heads": rows, "best": row}``."""
    probe = probe or ProbeSection()
    device = torch.device(device)
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    train = FeatureTable.from_tensors(train_features, device)
    val = FeatureTable.from_tensors(val_features, device)
    heads = make_heads(build_grid(list(train_features), probe.lrs, probe.weight_decays), train.dims, num_classes, seed, device)
    fit_precomputed(heads, train, train_labels, probe, seed=seed)
    rows, best = summarize(heads, evaluate_heads(heads, val, val_labels))
    return {"heads": rows, "best": best}


# -------------------------------------------------------------------------------------------- the run
def run_linear_probe(config: LinearProbeConfig) -> dict[str, Any] | None:
    """Features (cached or per epoch), the grid of heads, results in ``output_dir``; None on ranks other than 0."""
    validate(config)
    with evaluation_process(config.device) as device:
        return _run(config, device)


def _setup(config: LinearProbeConfig, device: torch.device):
    try:
        dtype = resolve_dtype(config.dtype, device)
        model = prepare_backbone(config.backbone, config.data.image_size, device, config.seed)
        request = FeatureRequest.for_features(config.features)
        request.check(model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return dtype, model, request


def _run(config: LinearProbeConfig, device: torch.device) -> dict[str, Any] | None:
    dtype, model, request = _setup(config, device)
    cache_dir = resolve_cache_dir(config.cache, config.cache_dir, config.output_dir)
    extract = dict(device=device, dtype=dtype, batch_size=config.batch_size, cache_dir=cache_dir, progress=config.progress)
    if config.probe.augment:
        train, (val, status) = None, features_for(model, val_data_config(config.data, config.val_data), request, tag="val", **extract)
        cache = {"val": status}
    else:
        train, val, cache = train_val_features(model, config.data, config.val_data, request, **extract)
    num_classes = _num_classes(config, train, val)
    dims = {spec: feature_dim(spec, model.embed_dim) for spec in config.features}
    heads = make_heads(build_grid(config.features, config.probe.lrs, config.probe.weight_decays), dims, num_classes,
                       config.seed, device)
    outcome = _train_and_evaluate(config, model, request, heads, train, val, device, dtype)
    if outcome is None:
        return None
    rows, best = outcome
    head_path = save_head(heads, best, Path(config.output_dir) / "best_head.safetensors")
    results = {
        "task": "linprobe",
        "protocol": {
            "head": "BatchNorm1d(affine=False, eps=1e-6) + Linear",
            "optimizer": config.probe.optimizer, "epochs": config.probe.epochs,
            "warmup_epochs": config.probe.warmup_epochs, "batch_size": config.probe.batch_size,
            "mode": "augmented" if config.probe.augment else "precomputed", "schedule": "warmup + cosine, per step",
        },
        "num_train": None if train is None else len(train),
        "num_val": len(val),
        "num_classes": num_classes,
        "cache": cache,
        "heads": rows,
        "best": best,
        "best_head_file": str(head_path),
    }
    path = write_results(config.output_dir, config, results)
    table_rows = [{**row, "best": "*" if row is best else ""} for row in rows]
    print(format_table(table_rows, ["features", "lr", "weight_decay", "top1", "top5", "best"]))
    print(f"best: {best['head']} top-1 {best['top1']:.2f}% top-5 {best['top5']:.2f}%  ({path})")
    return results


def _train_and_evaluate(config: LinearProbeConfig, model: nn.Module, request: FeatureRequest, heads: ProbeHeads,
                        train: FeatureSet | None, val: FeatureSet | None, device: torch.device, dtype: torch.dtype):
    """Train the grid (logging every epoch to metrics.jsonl) and evaluate it: ``(rows, best)`` on rank 0, else None."""
    from tqdm.auto import tqdm

    from evamim.engine import MetricsLogger

    main = is_main_process()
    grid = heads.grid
    val_table = FeatureTable.from_set(val, config.features, device) if main else None
    metrics = MetricsLogger(config.output_dir, is_main_process=main, total_steps=1, tensorboard=False, progress_bar=False)
    bar = tqdm(total=config.probe.epochs, desc="probe", unit="epoch", dynamic_ncols=True, disable=not (main and config.progress))

    def on_epoch(epoch: int, step: int, losses: torch.Tensor) -> None:
        bar.update(1)
        if not main:
            return
        bar.set_postfix(best_loss=f"{float(losses.min()):.4f}", refresh=False)
        metrics.log(step, {"epoch": epoch + 1, **{f"loss/{s.name}": float(l) for s, l in zip(grid, losses)}})
        every = config.probe.eval_every
        if every and (epoch + 1) % every == 0 and epoch + 1 < config.probe.epochs:
            scores = evaluate_heads(heads, val_table, val.labels)
            metrics.log(step, {"epoch": epoch + 1, **{f"top1/{s.name}": r["top1"] for s, r in zip(grid, scores)}}, prefix="eval")

    try:
        if config.probe.augment:
            trainer = _fit_augmented(config, model, request, heads, device, dtype, on_epoch)
        elif main:
            table = FeatureTable.from_set(train, config.features, device, preload=config.probe.preload)
            trainer = fit_precomputed(heads, table, train.labels, config.probe, seed=config.seed, on_epoch=on_epoch)
        if not main:
            return None
        rows, best = summarize(heads, evaluate_heads(heads, val_table, val.labels))
        final = {"epoch": config.probe.epochs, **{f"top1/{row['head']}": row["top1"] for row in rows}}
        metrics.log(trainer.step_count, final, prefix="eval")
        return rows, best
    finally:
        bar.close()
        metrics.close()


def _num_classes(config: LinearProbeConfig, train: FeatureSet | None, val: FeatureSet | None) -> int:
    """``config.num_classes``, else 1 + the largest label (of the training source's list in augmented mode);
    the same on every rank (rank 0 decides: only it holds the features)."""
    from evamim.tasks.features import broadcast_from_main

    if config.num_classes:
        return config.num_classes
    count = None
    if is_main_process():
        count = 1 + max(int(s.labels.max()) for s in (train, val) if s is not None)
        if config.probe.augment and config.data.source in ("folder", "list"):
            from evamim.data.sources import build_source

            count = max(count, 1 + max(entry.label for entry in build_source(config.data).entries))
    return broadcast_from_main(count)


def _fit_augmented(config: LinearProbeConfig, model: nn.Module, request: FeatureRequest, heads: ProbeHeads,
                   device: torch.device, dtype: torch.dtype, on_epoch: Callable) -> ProbeTrainer:
    """Each epoch: the fine-tuning transform, a backbone forward, one step of every head per batch (DDP across ranks)."""
    import torch.distributed as dist

    from evamim.data.loader import build_loader

    loader = build_loader(config.data, batch_size=config.probe.batch_size, purpose="finetune")
    trained: nn.Module = heads
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        trained = nn.parallel.DistributedDataParallel(heads, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(loader)
    trainer = ProbeTrainer(
        trained, probe_optimizer(heads, config.probe), total_steps=config.probe.epochs * steps_per_epoch,
        warmup_steps=round(config.probe.warmup_epochs * steps_per_epoch), min_lr_scale=config.probe.min_lr_scale,
    )
    for epoch in range(config.probe.epochs):
        loader.set_epoch(epoch)
        total = torch.zeros(len(heads.grid), device=device)
        for parts, batch in features_from_batches(model, loader, request, device=device, dtype=dtype):
            rows = FeatureSet(parts.get("block_cls"), parts.get("avg"), None, torch.empty(0), [])
            features = {spec: rows.get(spec) for spec in config.features}
            total += trainer.step(features, batch["labels"].to(device))
        on_epoch(epoch, trainer.step_count, total / max(steps_per_epoch, 1))
    return trainer


def save_head(heads: ProbeHeads, best: Mapping[str, Any], path: Path) -> Path:
    """The best head's BatchNorm statistics and Linear weights, with its feature choice in the metadata."""
    from safetensors.torch import save_file

    index = [spec.name for spec in heads.grid].index(best["head"])
    state = {name: value.detach().cpu().contiguous() for name, value in heads.heads[index].state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"features": best["features"], "lr": str(best["lr"]),
                                          "weight_decay": str(best["weight_decay"]), "top1": str(best["top1"])})
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/eval/linprobe_in1k.yaml",
                         "backbone.pretrained=runs/pretrain/model data.path=/data/in1k/train val_data.path=/data/in1k/val "
                         "'probe.lrs=[0.3,1,3]' 'features=[cls,last4+avg]'")


def run(args: argparse.Namespace) -> int:
    return run_config_command("linprobe", LinearProbeConfig, run_linear_probe, args)[0]
