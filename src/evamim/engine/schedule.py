"""Learning-rate and weight-decay schedules as pure functions of the global optimizer step.

There is no scheduler object and no scheduler state: the value for a step depends only on the step
and the run's settings, so a resumed run needs nothing but the step counter to continue the curve.

Step convention: ``step`` counts optimizer steps already taken, so the first update of a run uses
``step=0`` and the last one ``step=total_steps - 1``. Warmup is linear from 0 at ``step=0`` to
``base_lr`` at ``step=warmup_steps`` (the peak); after that the decay runs from ``base_lr`` at
``step=warmup_steps`` to ``min_lr`` at ``step=total_steps``.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

SCHEDULE_KINDS = ("cosine", "constant", "poly", "step")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup factor in [0, 1]: ``step / warmup_steps`` before the end of warmup, then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return max(step, 0) / warmup_steps


def decay_progress(step: int, total_steps: int, warmup_steps: int) -> float:
    """Fraction of the post-warmup phase done at ``step``, clamped to [0, 1]."""
    span = total_steps - warmup_steps
    if span <= 0:
        return 1.0
    return min(max((step - warmup_steps) / span, 0.0), 1.0)


def lr_at(
    step: int,
    total_steps: int,
    base_lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    kind: str = "cosine",
    power: float = 1.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    kind:
      ``cosine``   linear warmup from 0, then half a cosine from ``base_lr`` to ``min_lr``
                   (EVA, MAE, DINO: per-step, not per-epoch).
      ``constant`` linear warmup from 0, then ``base_lr``; ``min_lr`` is ignored.
      ``poly``     linear warmup from 0, then ``min_lr + (base_lr - min_lr) * (1 - t) ** power``
                   (the segmentation recipes, power 1.0 = linear decay).
      ``step``     linear warmup from 0, then ``base_lr * gamma ** k`` where k counts the ``milestones`` (steps)
                   already reached, ``step >= milestone`` (detectron2's multi-step schedule of the detection
                   recipes); ``min_lr`` is ignored.
    Past ``total_steps`` the value stays at the end value.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * warmup_factor(step, warmup_steps)
    if kind == "constant":
        return base_lr
    if kind == "step":
        return base_lr * gamma ** bisect.bisect_right(sorted(milestones), step)
    t = decay_progress(step, total_steps, warmup_steps)
    if kind == "cosine":
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))
    return min_lr + (base_lr - min_lr) * (1.0 - t) ** power


def weight_decay_at(step: int, total_steps: int, weight_decay: float, weight_decay_end: float | None = None) -> float:
    """Weight decay for step ``step``: constant, or a cosine from ``weight_decay`` to ``weight_decay_end``
    over the whole run (no warmup), as in DINO/EVA's optional wd schedule."""
    if weight_decay_end is None or weight_decay_end == weight_decay:
        return weight_decay
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    t = min(max(step / total_steps, 0.0), 1.0)
    return weight_decay_end + 0.5 * (weight_decay - weight_decay_end) * (1.0 + math.cos(math.pi * t))


def resolve_warmup_steps(warmup_steps: int | None, warmup_epochs: float, steps_per_epoch: int | None) -> int:
    """Warmup length in steps from exactly one of ``warmup_steps`` / ``warmup_epochs``.

    ``warmup_epochs`` needs ``steps_per_epoch``; fractional epochs round to the nearest step.
    """
    if warmup_steps is not None:
        if warmup_epochs:
            raise ValueError(
                f"both warmup_steps={warmup_steps} and warmup_epochs={warmup_epochs} are set; set only one "
                "(warmup_epochs=0 to use warmup_steps)"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return int(warmup_steps)
    if not warmup_epochs:
        return 0
    if steps_per_epoch is None:
        raise ValueError(
            f"warmup_epochs={warmup_epochs} needs the number of steps per epoch, which is unknown for this "
            "data (it has no len()); pass steps_per_epoch or set warmup_steps instead"
        )
    return int(round(warmup_epochs * steps_per_epoch))


def make_lr_schedule(
    total_steps: int,
    base_lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    kind: str = "cosine",
    power: float = 1.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """Bind the run's settings into a ``step -> lr`` function (validated once, here)."""
    lr_at(0, total_steps, base_lr, min_lr, warmup_steps, kind, power)  # raises on bad settings now, not mid-run
    milestones = tuple(sorted(int(m) for m in milestones))

    def schedule(step: int) -> float:
        return lr_at(step, total_steps, base_lr, min_lr, warmup_steps, kind, power, milestones, gamma)

    return schedule


def make_weight_decay_schedule(
    total_steps: int, weight_decay: float, weight_decay_end: float | None = None
) -> Callable[[int], float]:
    """Bind the run's settings into a ``step -> weight decay`` function."""

    def schedule(step: int) -> float:
        return weight_decay_at(step, total_steps, weight_decay, weight_decay_end)

    return schedule
