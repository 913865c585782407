"""What a task configures and gets back from the training loop: :class:`LoopConfig`, :class:`Hook`,
:class:`TrainResult` and the error that stops a diverging run, with the checks of the run length."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from evamim.engine.precision import PRECISIONS

if TYPE_CHECKING:
    from evamim.engine.loop.trainer import Trainer

StepFn = Callable[[nn.Module, Any], Mapping[str, Any]]


@dataclass
class LoopConfig:
    """Length, precision and bookkeeping of a training run."""

    total_steps: int | None = None
    """Run length in optimizer steps; set this or ``epochs``."""
    epochs: float | None = None
    """Run length in epochs (needs a known epoch length: ``len(data)`` or ``steps_per_epoch``)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast; preferred where supported) or ``fp16`` (autocast + dynamic loss scaling)."""
    grad_accum_steps: int = 1
    """Split each data batch into this many micro-batches and sum their gradients (batch size must divide)."""
    compile: bool = False
    """``torch.compile``: the task runner compiles each transformer block in place (the whole model when a task
    names no blocks); a bare Trainer compiles the model's forward. Costs a compilation at the start."""
    max_nonfinite_in_a_row: int = 20
    """Stop the run after this many consecutive steps skipped for a non-finite loss or gradient norm (>= 1).
    The default leaves room for the fp16 loss scaler to back off from 2**16 after overflows."""
    log_every: int = 10
    """Write averaged metrics every this many steps (and at the last step)."""
    eval_every: int = 0
    """Call the evaluation function every this many steps (0 = only at the last step, if one is given)."""
    progress_bar: bool = True
    """Show progress on the main process: a tqdm bar when stderr is a terminal; otherwise (SLURM logs, CI) a
    plain log line every ``log_every`` steps with the step, epoch, loss, lr, img/s and ETA."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""

    def __post_init__(self) -> None:
        # Checked when the config is built, so a bad value stops the run before any model exists.
        validate_loop_config(self)


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns."""

    step: int
    epoch: int
    nonfinite_skipped: int
    stopped_early: bool
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged training record (without ``time``)."""
    data_totals: dict[str, int] = field(default_factory=dict)
    """The data's ``bad_sample_totals()`` summed over the processes (``samples_tried``, ``samples_bad``), when
    the data counts them (see :mod:`~evamim.engine.data_cursor`)."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class Hook:
    """Callbacks into the loop; override what you need. A hook with ``state_dict()``/``load_state_dict()``
    (e.g. an EMA of the weights) is saved in and restored from checkpoints."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After resume, before the first step of this process."""

    def on_step_end(self, trainer: Trainer, metrics: Mapping[str, torch.Tensor | float], skipped: bool) -> None:
        """After optimizer step ``trainer.step`` (already incremented); ``metrics`` are that step's values."""

    def on_eval(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        """After an evaluation at ``trainer.step``."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step and the final checkpoint (not called when the run raises)."""


def len_or_none(data: Any) -> int | None:
    """``len(data)``, or None for iterables without one (streaming data: the epoch length is unknown)."""
    try:
        return len(data)
    except TypeError:
        return None


def resolve_total_steps(cfg: LoopConfig, steps_per_epoch: int | None) -> int:
    """The run length in optimizer steps, from ``loop.total_steps`` or ``loop.epochs`` x the epoch length."""
    if (cfg.total_steps is None) == (cfg.epochs is None):
        raise ValueError(f"set exactly one of loop.total_steps ({cfg.total_steps}) and loop.epochs ({cfg.epochs})")
    if cfg.total_steps is not None:
        if cfg.total_steps < 1:
            raise ValueError(f"loop.total_steps must be >= 1, got {cfg.total_steps}")
        return int(cfg.total_steps)
    if steps_per_epoch is None:
        raise ValueError(f"loop.epochs={cfg.epochs} needs the epoch length, but the data has no len(); "
                         "pass steps_per_epoch or set loop.total_steps")
    total = int(round(cfg.epochs * steps_per_epoch))
    if total < 1:
        raise ValueError(f"loop.epochs={cfg.epochs} x {steps_per_epoch} steps per epoch is less than one step")
    return total


def validate_loop_config(cfg: LoopConfig) -> None:
    """Raise ``ValueError`` naming the first ``loop.*`` value that cannot work."""
    if (cfg.total_steps is None) == (cfg.epochs is None):
        hint = ("set loop.epochs=null to run by steps, or loop.total_steps=null to run by epochs"
                if cfg.total_steps is not None else "set one of them")
        raise ValueError(f"set exactly one of loop.total_steps ({cfg.total_steps}) and loop.epochs ({cfg.epochs}): "
                         f"{hint}")
    if cfg.total_steps is not None and cfg.total_steps < 1:
        raise ValueError(f"loop.total_steps must be >= 1, got {cfg.total_steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise ValueError(f"loop.epochs must be > 0, got {cfg.epochs}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"loop.precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    for name in ("grad_accum_steps", "max_nonfinite_in_a_row", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"loop.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every < 0:
        raise ValueError(f"loop.eval_every must be >= 0, got {cfg.eval_every}")
