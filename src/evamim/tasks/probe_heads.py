"""The heads of a linear-probe grid (``evamim linprobe``): one BatchNorm + Linear head per (feature choice, lr,
weight decay), their optimizer settings and parameter groups, the tables of feature rows they read, the report of
their scores, and the best head's file."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from evamim.engine import OptimConfig, build_optimizer
from evamim.features.choices import feature_dim
from evamim.features.extract import FeatureSet

if TYPE_CHECKING:
    from evamim.tasks.linear_probe import ProbeSection


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
    """The whole grid: ``forward({feature: (B, D_feature)}) -> [logits (B, classes) per head]``.

    ``diverged`` (H,) bool marks the heads whose loss became non-finite: from then on they leave the training
    loss (so one lr that is too large cannot stop the grid) and are reported as diverged. It is a buffer, so
    checkpoints keep it.
    """

    def __init__(self, grid: Sequence[HeadSpec], dims: Mapping[str, int], num_classes: int):
        super().__init__()
        self.grid = list(grid)
        self.heads = nn.ModuleList(ProbeHead(dims[spec.feature], num_classes) for spec in self.grid)
        self.register_buffer("diverged", torch.zeros(len(self.grid), dtype=torch.bool))

    def forward(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [head(features[spec.feature]) for spec, head in zip(self.grid, self.heads)]

    def usable(self) -> list[bool]:
        """Per head: never diverged and every weight and running statistic finite."""
        flags = self.diverged.tolist()
        return [not flag and _finite(head) for flag, head in zip(flags, self.heads)]


def _finite(head: nn.Module) -> bool:
    tensors = [*head.parameters(), *(b for b in head.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def make_heads(grid: Sequence[HeadSpec], dims: Mapping[str, int], num_classes: int, seed: int,
               device: torch.device) -> ProbeHeads:
    """The grid's heads, initialised from ``seed`` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ProbeHeads(grid, dims, num_classes)
    return heads.to(device)


# ------------------------------------------------------------------------------------------ the optimizer
def probe_optim_config(probe: ProbeSection) -> OptimConfig:
    """The engine's optimizer settings for ``probe.*``: the schedule is a factor (warmup from 0 to 1, then a
    cosine to ``probe.min_lr_scale``) that every head's group multiplies by its own lr (``lr_scale``).

    Weight decay is per head (in the groups) and never scheduled, so the loop leaves it as the groups set it;
    no gradient clipping (MAE/EVA's probe has none, and one norm over the whole grid would couple the heads).
    """
    return OptimConfig(name=probe.optimizer, lr=1.0, min_lr=probe.min_lr_scale, schedule="cosine",
                       warmup_epochs=probe.warmup_epochs, weight_decay=0.0, momentum=probe.momentum,
                       trust_coefficient=probe.trust_coefficient, clip_grad=None)


def probe_param_groups(heads: ProbeHeads) -> list[dict]:
    """Two groups per head (Linear weight, Linear bias), each with that head's lr as ``lr_scale``; the
    weight has the head's weight decay, the bias none. (The BatchNorm has no parameter: affine=False.)"""
    groups = []
    for spec, head in zip(heads.grid, heads.heads):
        groups.append({"params": [head.linear.weight], "param_names": [f"{spec.name}/weight"], "lr_scale": spec.lr,
                       "weight_decay": spec.weight_decay, "wd_scale": 1.0})
        groups.append({"params": [head.linear.bias], "param_names": [f"{spec.name}/bias"], "lr_scale": spec.lr,
                       "weight_decay": 0.0, "wd_scale": 0.0})
    return groups


def probe_optimizer(heads: ProbeHeads, probe: ProbeSection) -> torch.optim.Optimizer:
    """One optimizer over all heads (what the task trains with, on one process)."""
    return build_optimizer(heads, probe_optim_config(probe), groups=probe_param_groups(heads))


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


# ------------------------------------------------------------------------------------------- reports
def summarize(heads: ProbeHeads, scores: Sequence[Mapping[str, float]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-head rows (diverged heads marked, their scores NaN) and the best row by top-1."""
    rows = []
    for spec, usable, score in zip(heads.grid, heads.usable(), scores):
        rows.append({
            "head": spec.name, "features": spec.feature, "lr": spec.lr, "weight_decay": spec.weight_decay,
            "top1": score["top1"] if usable else math.nan, "top5": score["top5"] if usable else math.nan,
            "diverged": not usable,
        })
    usable_rows = [row for row in rows if not row["diverged"]]
    if not usable_rows:
        raise RuntimeError("every head diverged (non-finite loss or weights): lower probe.lrs")
    return rows, max(usable_rows, key=lambda row: row["top1"])


def save_head(heads: ProbeHeads, best: Mapping[str, Any], path: Path) -> Path:
    """The best head's BatchNorm statistics and Linear weights, with its feature choice in the metadata."""
    from safetensors.torch import save_file

    index = [spec.name for spec in heads.grid].index(best["head"])
    state = {name: value.detach().cpu().contiguous() for name, value in heads.heads[index].state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"features": best["features"], "lr": str(best["lr"]),
                                          "weight_decay": str(best["weight_decay"]), "top1": str(best["top1"])})
    return path
