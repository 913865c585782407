"""How several processes share one model: the config, wrapping for DDP / ZeRO-1 / FSDP2, the optimizer.

Strategies (:class:`DistributedConfig`, ``strategy``):

- ``ddp``: every process holds the whole model and optimizer; gradients are all-reduced (averaged)
  in buckets during backward. Accumulation micro-steps skip the all-reduce (``no_sync``).
- ``zero1``: DDP for the gradients plus ``ZeroRedundancyOptimizer``: each process keeps the optimizer
  state (AdamW moments) of 1/world of the parameters, steps those and broadcasts them (ZeRO stage 1,
  what the EVA paper ran with DeepSpeed).
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block, then on the root: parameters,
  gradients and optimizer state are all sharded; each block's parameters are all-gathered just
  before it runs and freed after.

With one process every strategy trains the plain model (no wrapper); only the checkpoint format
follows the strategy (single file, or sharded directories for ``fsdp``), so a run can move between
one and many processes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from evamim.dtypes import PRECISIONS
from evamim.engine.distributed.collectives import broadcast_module_state

_log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "zero1", "fsdp")
TEACHER_PLACEMENTS = ("replicate",)
DTYPE_NAMES = PRECISIONS  # the one table (evamim.dtypes), under the name callers know


@dataclass
class FsdpOptions:
    """FSDP2 settings (``distributed.strategy=fsdp``)."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for backward
    (ZeRO-3 memory); False keeps them until backward (ZeRO-2-like: more memory, one all-gather less)."""
    param_dtype: str | None = None
    """``bf16`` / ``fp16``: all-gather and compute with parameters in that dtype (half the traffic);
    None: gather fp32 parameters and let ``loop.precision``'s autocast choose the compute dtype."""
    reduce_dtype: str | None = "fp32"
    """Dtype of the gradient reduce-scatter; fp32 keeps the averaged gradients exact to fp32 rounding.
    None: the parameter dtype."""


@dataclass
class DistributedConfig:
    """How several processes share the training (ignored with one process, except the checkpoint format)."""

    strategy: str = "ddp"
    """``ddp`` (replicated model and optimizer), ``zero1`` (optimizer state sharded: the EVA paper's
    DeepSpeed ZeRO-1) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded)."""
    backend: str = "auto"
    """``auto`` (nccl on CUDA, gloo on CPU) or any torch.distributed backend string."""
    timeout_minutes: float = 30.0
    """A collective that waits longer than this fails the run (a dead or stuck rank). Raise it if
    checkpoints take longer than this to write (the other ranks wait for the writer)."""
    find_unused_parameters: bool = False
    """DDP: look for parameters that got no gradient on every backward (slow; only for models that
    skip parameters). The pre-training student uses every parameter."""
    bucket_cap_mb: float = 25.0
    """DDP: gradient all-reduce bucket size."""
    teacher: str = "replicate"
    """Where the frozen teacher lives: ``replicate`` (a full copy on every process; a CLIP-L/14 is
    0.3B parameters, 0.6 GB in bf16). Sharding the teacher is not implemented."""
    fsdp: FsdpOptions = field(default_factory=FsdpOptions)

    def problems(self) -> list[str]:
        """What is wrong with this config, as messages naming the key and the valid values."""
        found = []
        if self.strategy not in STRATEGIES:
            found.append(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not self.timeout_minutes > 0:
            found.append(f"distributed.timeout_minutes must be > 0, got {self.timeout_minutes}")
        if not self.bucket_cap_mb > 0:
            found.append(f"distributed.bucket_cap_mb must be > 0, got {self.bucket_cap_mb}")
        if self.teacher not in TEACHER_PLACEMENTS:
            found.append(f"distributed.teacher must be 'replicate' (every process holds the frozen teacher), "
                         f"got {self.teacher!r}")
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self.fsdp, key)
            if value is not None and value not in DTYPE_NAMES:
                found.append(f"distributed.fsdp.{key} must be null or one of {', '.join(DTYPE_NAMES)}, got {value!r}")
        return found


def wrap_model(
    module: nn.Module,
    cfg: DistributedConfig,
    *,
    device: torch.device,
    world_size: int,
    shard_units: Iterable[nn.Module] = (),
    sync_buffers: bool = True,
) -> nn.Module:
    """``module`` ready for ``cfg.strategy`` on ``world_size`` processes (returned as is with one).

    ``module`` is the module whose ``forward`` runs the whole computation that needs gradients (for
    pre-training the ``ObjectiveModule``: hooks of the wrappers only see calls that go through it).
    ``shard_units``: the submodules FSDP shards one by one (the transformer blocks); the rest of
    ``module`` is sharded as one root unit. ``sync_buffers``: DDP re-broadcasts rank 0's buffers before
    every forward; needless for models without running statistics (buffers are synced once at wrapping
    either way).
    """
    if world_size == 1:
        if cfg.strategy != "ddp":
            _log.info("distributed.strategy=%s with one process: training the plain model", cfg.strategy)
        return module
    if cfg.strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        # torch >= 2.13 renamed the per-forward buffer broadcast; older versions only know the old name.
        sync_key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
            bucket_cap_mb=cfg.bucket_cap_mb,
            # Gradients live in the all-reduce buckets instead of beside them: one gradient copy less.
            gradient_as_bucket_view=True,
            **{sync_key: sync_buffers},
        )
    return _fully_shard(module, cfg.fsdp, list(shard_units))


def _fully_shard(module: nn.Module, options: FsdpOptions, units: Sequence[nn.Module]) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Each process shards the weights it built itself: make sure they are rank 0's everywhere
    # (DDP does the same broadcast when it wraps).
    broadcast_module_state(module)
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPE_NAMES[options.param_dtype] if options.param_dtype else None,
        reduce_dtype=DTYPE_NAMES[options.reduce_dtype] if options.reduce_dtype else None,
    )
    for unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    scalars = {parameter for parameter in module.parameters() if parameter.ndim == 0}
    fully_shard(module, mp_policy=policy, reshard_after_forward=options.reshard_after_forward,
                ignored_params=scalars or None)
    for parameter in scalars:
        average_gradient_over_processes(parameter)
    return module


def average_gradient_over_processes(parameter: nn.Parameter) -> None:
    """Keep a parameter FSDP cannot shard (a 0-d one: CLIP's ``logit_scale``) replicated: after each backward its
    gradient becomes the mean over processes, as FSDP's reduce-scatter makes the others'. Under accumulation the
    running gradient is averaged after every micro-batch, which gives the same mean (what was already averaged is
    equal on every process)."""
    import torch.distributed as dist

    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(dist.get_world_size())

    parameter.register_post_accumulate_grad_hook(hook)


def build_optimizer_for_strategy(
    strategy: str,
    groups: list[dict],
    factory: Callable[[list[dict]], torch.optim.Optimizer],
    *,
    world_size: int,
    defaults: Mapping[str, Any],
) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (from ``evamim.engine.optim.param_groups``): ``factory(groups)``,
    or for ``zero1`` with several processes a ``ZeroRedundancyOptimizer`` whose per-process optimizer
    is ``factory(this process's share of the groups)``.

    The ZeRO wrapper exposes the full groups with their ``lr_scale``/``wd_scale``; the loop sets every
    group's lr and weight decay there and ZeRO copies them into the local optimizer before each step.
    ``defaults``: hyper-parameters the groups may lack (``lr``, ``weight_decay``, ...).
    """
    if strategy != "zero1" or world_size == 1:
        return factory(groups)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def local_optimizer(local_groups, **_defaults):
        # The defaults were already merged into the groups by the ZeRO wrapper.
        return factory(local_groups)

    return ZeroRedundancyOptimizer(groups, optimizer_class=local_optimizer, **dict(defaults))


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module):
    """FSDP2's counterpart of DDP's ``no_sync()``: skip the gradient reduce-scatter (accumulate unsharded
    gradients) inside the context; the next backward outside it reduces everything accumulated."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_fsdp(model: nn.Module) -> bool:
    """True for a module sharded with FSDP2 ``fully_shard``."""
    return callable(getattr(model, "set_requires_gradient_sync", None)) and callable(getattr(model, "unshard", None))
