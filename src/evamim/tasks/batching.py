"""How many images one optimizer step sees, per forward, per process and over all processes.

Two ways to say it in every training task's config:

- ``batch_size`` alone (``global_batch_size: null``): images per process and optimizer step, split into
  ``loop.grad_accum_steps`` micro-batches; the global batch is ``batch_size x processes``.
- ``global_batch_size`` (as timm / Hugging Face users expect): images per optimizer step over all processes.
  ``batch_size`` is then the micro-batch of one forward on one process, and the accumulation is derived:
  ``global_batch_size = batch_size x processes x accumulation``. ``loop.grad_accum_steps`` must be left at 1.

``--dry-run`` prints the resulting :class:`BatchPlan`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    """Images per forward on one process."""
    grad_accum_steps: int
    """Forwards per optimizer step."""
    processes: int

    @property
    def per_process(self) -> int:
        """Images per optimizer step on one process (what the training loader yields)."""
        return self.micro_batch * self.grad_accum_steps

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes: what the optimizer sees."""
        return self.per_process * self.processes

    def describe(self) -> str:
        return (f"{self.global_batch} images per optimizer step = {self.micro_batch} per forward x "
                f"{self.processes} process(es) x {self.grad_accum_steps} accumulation step(s)")

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "per_process": self.per_process, "global_batch": self.global_batch}


def batch_problems(config: Any, world_size: int) -> list[str]:
    """Why ``config.batch_size`` / ``global_batch_size`` / ``loop.grad_accum_steps`` do not make a batch plan
    on ``world_size`` processes (messages name the keys and a fix)."""
    batch, accumulation = config.batch_size, config.loop.grad_accum_steps
    wanted = getattr(config, "global_batch_size", None)
    if batch < 1:
        return [f"batch_size must be >= 1, got {batch}"]
    if wanted is None:
        if accumulation < 1 or batch % accumulation:
            fixed = max(1, batch // max(accumulation, 1)) * max(accumulation, 1)
            return [f"batch_size {batch} is not divisible by loop.grad_accum_steps {accumulation}: change one of "
                    f"them (e.g. batch_size={fixed})"]
        return []
    if wanted < 1:
        return [f"global_batch_size must be >= 1 or null, got {wanted}"]
    if accumulation != 1:
        return [f"global_batch_size={wanted} derives the accumulation itself: leave loop.grad_accum_steps at 1 "
                f"(got {accumulation})"]
    per_forward = batch * world_size
    if wanted % per_forward:
        return [f"global_batch_size {wanted} is not a multiple of batch_size {batch} x {world_size} process(es) "
                f"= {per_forward}: choose global_batch_size={max(1, round(wanted / per_forward)) * per_forward} "
                "or another batch_size"]
    return []


def batch_plan(config: Any, world_size: int) -> BatchPlan:
    """The plan of a config that passed :func:`batch_problems`."""
    wanted = getattr(config, "global_batch_size", None)
    if wanted is None:
        accumulation = config.loop.grad_accum_steps
        return BatchPlan(config.batch_size // accumulation, accumulation, world_size)
    return BatchPlan(config.batch_size, wanted // (config.batch_size * world_size), world_size)


def launch_world_size() -> int:
    """The number of processes the launcher (torchrun, srun) started; 1 without one or when it is inconsistent
    (the process group's own checks report that)."""
    from evamim.engine.distributed import DistributedEnvError, read_launch_env

    try:
        return read_launch_env(use_scontrol=False).world_size
    except DistributedEnvError:
        return 1
