"""``evamim knn``: weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Protocol (Wu et al. 2018, as in DINO's ``eval_knn.py``):

1. Features of the training and validation images (evaluation transform: resize, centre crop) from
   the frozen backbone, L2-normalised.
2. For each validation feature q: cosine similarity to every training feature, the k most similar
   training samples ``s_1 >= ... >= s_k`` with labels ``y_1 ... y_k``.
3. Class votes ``v_c = sum_j [y_j = c] * exp(s_j / T)`` (T = 0.07); the prediction is the class with
   the largest vote (ties: the lower class index). Top-5 counts a hit when the true class has a positive
   vote among the 5 largest, so classes no neighbour voted for never count.
4. Every k of ``ks`` comes from the same top-``max(ks)`` search: neighbours are sorted, so the first
   k of them are the k nearest.

Memory: the training features stay on the device; validation features go through in chunks of
``chunk_size`` rows, each needing a (chunk_size, N_train) similarity matrix.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from evamim.config import ConfigError
from evamim.data.config import DataConfig
from evamim.engine.distributed import is_main_process
from evamim.features.choices import check_features
from evamim.features.pipeline import (
    backbone_for_features,
    check_model_and_data,
    resolve_cache_dir,
    train_val_features,
)
from evamim.features.val_data import ValDataSection, class_problems
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import ModelSection, format_table, output_dirs_problems, write_results
from evamim.tasks.runner import evaluation_process

logger = logging.getLogger(__name__)


@dataclass
class KnnConfig:
    """``evamim knn``; defaults follow DINO (k in 10, 20, 100, 200; T = 0.07; cls token)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(labels=True))
    """The training (reference) set: ``data.source``, ``data.path``, ``data.image_size``, ``data.crop_pct``..."""
    val_data: ValDataSection = field(default_factory=ValDataSection)
    """The validation set: ``val_data.path`` (same settings as ``data``) or ``val_data.holdout``."""
    features: list[str] = field(default_factory=lambda: ["cls"])
    """Feature choices, each evaluated: cls, avg, cls+avg, lastN, last4+avg, ... (see docs/evaluation.md)."""
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    batch_size: int = 256
    """Images per forward pass during extraction (per process)."""
    chunk_size: int = 512
    """Validation rows per similarity block: memory ~ chunk_size x N_train x 4 bytes."""
    cache: bool = True
    """Save the features and reuse them when backbone, data and feature choices are unchanged."""
    cache_dir: str | None = None
    """Where cached features go; None = ``<output_dir>/features``. Share it between runs and tasks."""
    output_dir: str = "runs/knn"
    device: str = "auto"
    precision: str = "auto"
    """Autocast dtype of the backbone: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."""
    seed: int = 0
    """Seeds a randomly initialised backbone (no ``model.pretrained``) and the holdout split."""
    progress: bool = True


def validate(config: KnnConfig) -> None:
    """Raise ConfigError listing everything that would fail later, before any model or data is built."""
    problems: list[str] = []
    check_model_and_data(config.model, config.data, config.precision, problems, needs_labels=True)
    problems += config.val_data.check(config.data) or class_problems(config.data, config.val_data)
    check_features(config.features, problems)
    if not config.ks or min(config.ks) < 1:
        problems.append(f"ks must be a non-empty list of positive integers, got {list(config.ks)}")
    if config.temperature <= 0:
        problems.append(f"temperature must be > 0, got {config.temperature}")
    for key in ("batch_size", "chunk_size"):
        if getattr(config, key) < 1:
            problems.append(f"{key} must be >= 1, got {getattr(config, key)}")
    problems += output_dirs_problems(config.output_dir, config.cache_dir if config.cache else None)
    if problems:
        raise ConfigError("invalid knn config:\n  " + "\n  ".join(problems))


# -------------------------------------------------------------------------------------- the classifier
def weighted_votes(similarities: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Class probabilities from the k nearest neighbours.

    similarities (M, k) cosine similarities, sorted descending per row; neighbour_labels (M, k) long ->
    (M, num_classes) with ``p_c = sum_j [y_j = c] exp(s_j / T) / sum_j exp(s_j / T)``.
    """
    # exp((s - s_max) / T) equals exp(s / T) up to a per-row factor that normalisation removes, and cannot
    # overflow (exp(1 / 0.01) does not fit in float32).
    weights = ((similarities - similarities[:, :1]) / temperature).exp()
    votes = torch.zeros(similarities.shape[0], num_classes, device=similarities.device, dtype=weights.dtype)
    votes.scatter_add_(1, neighbour_labels, weights)
    return votes / votes.sum(dim=1, keepdim=True)


def vote_hits(votes: torch.Tensor, labels: torch.Tensor, tops: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows of votes (M, C) rank their label (M,) among the ``t`` largest with a positive vote.

    Ties rank the lower class index first (a stable descending sort), so results are deterministic.
    """
    order = torch.sort(votes, dim=1, descending=True, stable=True).indices
    position = (order == labels.unsqueeze(1)).int().argmax(dim=1)
    voted = votes.gather(1, labels.unsqueeze(1)).squeeze(1) > 0
    return {t: int(((position < t) & voted).sum()) for t in tops}


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    *,
    num_classes: int | None = None,
    chunk_size: int = 512,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """Weighted kNN top-1/top-5 accuracy (percent) for every k in ``ks``, in one neighbour search.

    train_features (N, D), train_labels (N,) long, val_features (M, D), val_labels (M,) long; features
    are L2-normalised here. Returns ``{k: {"top1": ..., "top5": ...}}``.
    """
    ks = sorted(set(int(k) for k in ks))
    if ks[0] < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    if ks[-1] > len(train_features):
        raise ValueError(f"k={ks[-1]} exceeds the {len(train_features)} training samples; use smaller ks")
    device = torch.device(device) if device is not None else train_features.device
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    bank = F.normalize(train_features.float().to(device), dim=1)
    bank_labels = train_labels.long().to(device)
    hits = {k: {1: 0, 5: 0} for k in ks}
    for start in range(0, len(val_features), chunk_size):
        queries = F.normalize(val_features[start : start + chunk_size].float().to(device), dim=1)
        labels = val_labels[start : start + chunk_size].long().to(device)
        similarities, neighbours = (queries @ bank.T).topk(ks[-1], dim=1)
        neighbour_labels = bank_labels[neighbours]
        for k in ks:
            votes = weighted_votes(similarities[:, :k], neighbour_labels[:, :k], temperature, num_classes)
            for top, count in vote_hits(votes, labels).items():
                hits[k][top] += count
    total = max(len(val_features), 1)
    return {k: {"top1": 100.0 * hits[k][1] / total, "top5": 100.0 * hits[k][5] / total} for k in ks}


# -------------------------------------------------------------------------------------------- the run
def run_knn(config: KnnConfig) -> dict[str, Any] | None:
    """Extract (or load cached) features, classify, write ``output_dir/{config.yaml, results.json}``.

    Returns the results dict on rank 0, None on the other ranks (they only help extracting).
    """
    validate(config)
    with evaluation_process(config.device) as device:
        return _run(config, device)


def _run(config: KnnConfig, device: torch.device) -> dict[str, Any] | None:
    model, request, dtype = backbone_for_features(config, device)
    cache_dir = resolve_cache_dir(config.cache, config.cache_dir, config.output_dir)
    train, val, cache = train_val_features(
        model, config.data, config.val_data, request, device=device, dtype=dtype,
        batch_size=config.batch_size, cache_dir=cache_dir, progress=config.progress,
    )
    if not is_main_process():
        return None
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    rows = []
    for spec in config.features:
        try:
            scores = knn_classify(
                train.get(spec), train.labels, val.get(spec), val.labels, config.ks, config.temperature,
                num_classes=num_classes, chunk_size=config.chunk_size, device=device,
            )
        except ValueError as error:
            raise ConfigError(f"knn: {error}") from None
        rows += [{"features": spec, "k": k, "top1": s["top1"], "top5": s["top5"]} for k, s in scores.items()]
    best = max(rows, key=lambda row: row["top1"])
    results = {
        "task": "knn",
        "protocol": {"temperature": config.temperature, "ks": sorted(set(config.ks)), "similarity": "cosine"},
        "num_train": len(train),
        "num_val": len(val),
        "num_classes": num_classes,
        "missing": {"train": train.missing, "val": val.missing},
        "cache": cache,
        "results": rows,
        "best": best,
    }
    path = write_results(config.output_dir, config, results)
    print(format_table(rows, ["features", "k", "top1", "top5"]))
    print(f"best: {best['features']} k={best['k']} top-1 {best['top1']:.2f}%  ({len(train)} train, {len(val)} val; {path})")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None,
                         "model.pretrained=runs/pretrain/model data.path=/data/in1k/train val_data.path=/data/in1k/val")


def run(args: argparse.Namespace) -> int:
    return run_config_command("knn", KnnConfig, run_knn, args)[0]
