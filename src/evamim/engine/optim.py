"""Parameter groups (weight-decay exemptions, layer-wise lr decay) and optimizers (AdamW, LARS, SGD).

The model may expose two optional hooks; any ``nn.Module`` works without them:

- ``model.no_weight_decay() -> set[str]``: parameter names, or module-name prefixes (``"rel_pos"``
  exempts ``"rel_pos.table"``), that get no weight decay. 1-D parameters (biases, norm weights) never
  get weight decay, hook or not.
- ``model.layer_id(param_name) -> int`` and ``model.num_layers() -> int``: needed only with
  ``layer_decay``. Layer 0 is the stem (patch embed, position embedding, cls/mask tokens), block ``i``
  is ``i + 1``, everything after the blocks (final norm, heads) is ``num_layers + 1``.

Each group carries ``lr_scale`` and ``wd_scale``; :func:`set_hparams` turns the scheduled base lr and
weight decay into per-group values, so a schedule is one number per step whatever the grouping.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from evamim.engine.modules import unwrap_model
from evamim.engine.schedule import SCHEDULE_KINDS

OPTIMIZERS = ("adamw", "lars", "sgd")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping of one run."""

    name: str = "adamw"
    """Optimizer: ``adamw`` (pre-training, fine-tuning), ``lars`` (linear probe) or ``sgd``."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup (used as given: no batch-size rescaling)."""
    min_lr: float = 1e-5
    """Learning rate at the last step for the ``cosine`` and ``poly`` schedules."""
    schedule: str = "cosine"
    """``cosine``, ``constant``, ``poly`` or ``step``; all warm up linearly from 0 first."""
    poly_power: float = 1.0
    """Exponent of the ``poly`` schedule (1.0 = linear decay)."""
    milestones: list[int] = field(default_factory=list)
    """The ``step`` schedule: optimizer steps from which the lr is multiplied by ``gamma`` once more."""
    gamma: float = 0.1
    """The ``step`` schedule's factor at each milestone."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps; leave ``None`` to use ``warmup_epochs``."""
    warmup_epochs: float = 0.0
    """Warmup length in epochs (needs a known epoch length); 0 with ``warmup_steps=None`` = no warmup."""
    weight_decay: float = 0.05
    """Decoupled weight decay for the parameters that are decayed (see the module docstring)."""
    weight_decay_end: float | None = None
    """If set, weight decay follows a cosine from ``weight_decay`` to this value over the run."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas; EVA uses 0.98 for beta2 (more stable than 0.999 at large batch)."""
    eps: float = 1e-6
    """AdamW epsilon (EVA: 1e-6)."""
    momentum: float = 0.9
    """Momentum of ``sgd`` and ``lars``."""
    nesterov: bool = False
    """Nesterov momentum for ``sgd``."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient (eta): the per-layer step is ``eta * |w| / |g + wd * w|`` times the lr."""
    layer_decay: float | None = None
    """Layer-wise lr decay: layer ``i`` of ``L`` gets ``lr * layer_decay ** (L + 1 - i)``; ``None`` = off."""
    clip_grad: float | None = 3.0
    """Clip the total gradient norm (L2 over all parameters) to this; ``None`` or 0 = no clipping (norm still logged)."""

    def __post_init__(self) -> None:
        # Checked when the config is built, so a bad value stops the run before any model exists.
        found = self.problems()
        if found:
            raise ValueError("; ".join(found))

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming its ``optim.*`` key and the valid values."""
        found = []
        if self.name not in OPTIMIZERS:
            close = difflib.get_close_matches(str(self.name), OPTIMIZERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.append(f"optim.name: unknown optimizer {self.name!r}{hint}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULE_KINDS:
            found.append(f"optim.schedule: unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
        for key in ("lr", "min_lr", "weight_decay", "eps", "warmup_epochs"):
            value = getattr(self, key)
            if not value >= 0:  # also refuses NaN
                found.append(f"optim.{key} must be >= 0, got {value}")
        for key in ("weight_decay_end", "clip_grad"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                found.append(f"optim.{key} must be >= 0 or null, got {value}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            found.append(f"optim.warmup_steps must be >= 0 or null, got {self.warmup_steps}")
        if self.warmup_steps is not None and self.warmup_epochs:
            found.append(f"optim.warmup_steps={self.warmup_steps} and optim.warmup_epochs={self.warmup_epochs} are "
                         "both set; set only one (optim.warmup_epochs=0 to use warmup_steps)")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            found.append(f"optim.betas must be two values in [0, 1), e.g. [0.9, 0.98], got {list(self.betas)}")
        if not 0 <= self.momentum < 1:
            found.append(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if not self.poly_power > 0:
            found.append(f"optim.poly_power must be > 0, got {self.poly_power}")
        if self.schedule == "step" and not self.milestones:
            found.append("optim.schedule=step needs optim.milestones (the optimizer steps where the lr drops)")
        if self.milestones and self.schedule != "step":
            found.append(f"optim.milestones {list(self.milestones)} only apply to optim.schedule=step, not "
                         f"{self.schedule!r}")
        if any(int(m) < 1 for m in self.milestones):
            found.append(f"optim.milestones must be optimizer steps >= 1, got {list(self.milestones)}")
        if not 0 < self.gamma <= 1:
            found.append(f"optim.gamma must be in (0, 1], got {self.gamma}")
        if not self.trust_coefficient > 0:
            found.append(f"optim.trust_coefficient must be > 0, got {self.trust_coefficient}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            found.append(f"optim.layer_decay must be in (0, 1] or null (off), got {self.layer_decay}")
        return found


def _is_exempt(name: str, exempt: set[str]) -> bool:
    """True if ``name`` is in ``exempt`` or lies under a module named there (dotted prefix)."""
    return any(name == entry or name.startswith(entry + ".") for entry in exempt)


def _num_layers(model: nn.Module, num_layers: int | None) -> int:
    if num_layers is not None:
        return num_layers
    if not hasattr(model, "num_layers"):
        raise ValueError(
            f"layer_decay needs the number of layers: {type(model).__name__} has no num_layers() method; "
            "pass num_layers=... or set layer_decay to None"
        )
    return int(model.num_layers())


def _layer_id(model: nn.Module, name: str, num_layers: int) -> int:
    if not hasattr(model, "layer_id"):
        raise ValueError(
            f"layer_decay needs {type(model).__name__}.layer_id(param_name) to assign parameters to layers; "
            "add it to the model or set layer_decay to None"
        )
    layer = int(model.layer_id(name))
    if not 0 <= layer <= num_layers + 1:
        raise ValueError(f"layer_id({name!r}) = {layer} is outside [0, num_layers + 1 = {num_layers + 1}]")
    return layer


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    no_weight_decay: Iterable[str] | None = None,
) -> list[dict]:
    """Optimizer parameter groups for the trainable parameters of ``model``.

    Groups are keyed by (layer id, decayed or not) and ordered by that key, so the same model always
    gives the same groups (optimizer state in a checkpoint is matched by position).
    Each group: ``params``, ``param_names``, ``weight_decay`` (0 for exempt ones), ``wd_scale``
    (1.0 or 0.0), ``lr_scale`` (``layer_decay ** (num_layers + 1 - layer_id)``, or 1.0), ``layer_id``.

    ``no_weight_decay`` overrides ``model.no_weight_decay()`` when given. Frozen parameters are left out.
    """
    model = unwrap_model(model)
    if no_weight_decay is None:
        no_weight_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    exempt = set(no_weight_decay)
    layers = _num_layers(model, num_layers) if layer_decay is not None else 0

    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-D tensors are biases and norm gains: decaying them towards 0 only hurts (BEiT, MAE, EVA).
        decay = param.ndim > 1 and not _is_exempt(name, exempt)
        layer = _layer_id(model, name, layers) if layer_decay is not None else 0
        group = groups.get((layer, decay))
        if group is None:
            lr_scale = layer_decay ** (layers + 1 - layer) if layer_decay is not None else 1.0
            group = groups[(layer, decay)] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "wd_scale": 1.0 if decay else 0.0,
                "lr_scale": float(lr_scale),
                "layer_id": layer,
            }
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False?)")
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used for linear probes
    by MoCo v3, MAE and EVA.

    For every parameter with more than one dimension, the update ``g + wd * w`` is rescaled by the trust
    ratio ``eta * |w| / |g + wd * w|``; 1-D parameters (biases, norm gains) are neither adapted nor decayed,
    so the linear probe's BatchNorm stays a plain normaliser.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    # A zero-initialised weight or a zero update has no meaningful ratio: take the plain step.
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                param.add_(buf, alpha=-group["lr"])
        return loss


def _all_on_cuda(groups: list[dict]) -> bool:
    return all(p.is_cuda for g in groups for p in g["params"])


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, num_layers: int | None = None,
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` over :func:`param_groups` of ``model`` (or over ``groups``).

    The lr set here is the peak lr; the training loop overwrites every group's lr each step from the
    schedule (:func:`set_hparams`), so what is passed here only matters before the first step.
    AdamW uses the fused kernel when every parameter is on CUDA and the multi-tensor (foreach) one
    otherwise.
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if groups is None:
        groups = param_groups(model, cfg.weight_decay, layer_decay=cfg.layer_decay, num_layers=num_layers)
    if cfg.name == "adamw":
        fused = _all_on_cuda(groups)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=fused or None, foreach=None if fused else True)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                    trust_coefficient=cfg.trust_coefficient)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, foreach=True)


def set_hparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set every group's ``lr = lr * lr_scale`` and, if ``weight_decay`` is given,
    ``weight_decay = weight_decay * wd_scale`` (groups without the scale keys count as 1.0 for lr;
    a weight-decay schedule needs ``wd_scale`` on every group so exempt groups stay at 0)."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None:
            if "wd_scale" not in group:
                raise ValueError(
                    f"param group {index} has no 'wd_scale', so a weight-decay schedule cannot tell whether it "
                    "is exempt from decay; build the groups with evamim.engine.optim.param_groups or add "
                    "wd_scale (1.0 decayed, 0.0 exempt)"
                )
            group["weight_decay"] = weight_decay * group["wd_scale"]
