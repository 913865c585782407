"""What the loop needs from several processes, without depending on how they were set up: gathering and
averaging across processes, skipping a gradient synchronisation, and reading sharded (DTensor) values."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``: a collective every process calls (needs a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 but torch.distributed is not initialised; initialise the process group "
                           "first or pass all_gather to the Trainer")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Each value's mean over the processes (a collective; imported late, so one process needs no process group)."""
    from evamim.engine.distributed import all_reduce_mean as reduce

    return reduce(values)


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Skip the gradient synchronisation of this backward: DDP's ``no_sync()``, FSDP2's
    ``set_requires_gradient_sync(False)``; nothing for an unwrapped model."""
    ddp_no_sync = getattr(model, "no_sync", None)
    if callable(ddp_no_sync):
        return ddp_no_sync()
    from evamim.engine.distributed import fsdp_no_sync, is_fsdp

    return fsdp_no_sync(model) if is_fsdp(model) else contextlib.nullcontext()


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2's sharded parameters and gradients), found by duck typing."""
    return callable(getattr(tensor, "full_tensor", None))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as a plain tensor (a collective for sharded or partial ones); others as they are."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor
