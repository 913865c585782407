"""Rank helpers and collectives: the rank and world size, barriers, reductions, and gathering rows on rank 0.

Every function here also works without a process group (one process): ranks are 0, reductions are the
identity and gathers return the caller's own data.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

# Rows are gathered in pieces of about this many bytes, so a rank never stages its whole share at once.
GATHER_CHUNK_BYTES = 256 << 20


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the process that writes logs, checkpoints and exports."""
    return get_rank() == 0


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; every other backend here takes CPU tensors."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    import torch.distributed as dist

    if not _initialized():
        return
    if _collective_device().type == "cuda":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over processes of each value (a collective: every process calls it with the same keys).

    Used for logged metrics: the loss each process computed on its own batch -> the global mean.
    Identity with one process.
    """
    import torch.distributed as dist

    if not _initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` with one process)."""
    import torch.distributed as dist

    if not _initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_ranks_agree(flag: bool) -> bool:
    """True when ``flag`` is True on every process (a collective)."""
    return all(all_gather_object(bool(flag)))


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every process's ``module`` (a collective)."""
    import torch.distributed as dist

    if not _initialized():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective when distributed; the value itself otherwise)."""
    import torch.distributed as dist

    if not _initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_rows(tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor | None:
    """Every rank's rows of ``tensor`` (n_rank, ...) concatenated in rank order, on rank 0 (None elsewhere).

    A collective; ``counts`` (every rank's n_rank, known on all ranks) sets the padding. Rows travel
    in padded pieces of about ``GATHER_CHUNK_BYTES`` on the backend's device. Without a process group:
    ``tensor`` itself.
    """
    import torch.distributed as dist

    if not _initialized():
        return tensor
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _collective_device()
    tail = tuple(tensor.shape[1:])
    row_bytes = max(1, math.prod(tail) * tensor.element_size())
    chunk = max(1, GATHER_CHUNK_BYTES // row_bytes)
    longest = max(counts)
    received: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, longest, chunk):
        size = min(chunk, longest - start)
        piece = torch.zeros((size, *tail), dtype=tensor.dtype, device=device)
        mine = tensor[start : start + size]
        piece[: mine.shape[0]] = mine.to(device)
        pieces = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, pieces, dst=0)
        if rank == 0:
            for source, part in enumerate(pieces):
                keep = min(max(counts[source] - start, 0), size)
                received[source].append(part[:keep].cpu())
    if rank != 0:
        return None
    flat = [part for parts in received for part in parts]
    return torch.cat(flat) if flat else tensor.new_empty((0, *tail))


def gather_to_main(tensors: Mapping[str, torch.Tensor], info: Any) -> tuple[dict[str, torch.Tensor], list] | None:
    """Gather named row tensors (the same row count within a rank) and a small picklable ``info`` per rank.

    Returns ``(tensors concatenated in rank order, [info of rank 0, rank 1, ...])`` on rank 0, None elsewhere
    (a collective: every rank passes the same names).

    Raises:
        ValueError: no tensors, or tensors of one rank with different row counts.
    """
    counts_here = {int(value.shape[0]) for value in tensors.values()}
    if len(counts_here) != 1:
        raise ValueError(f"gather_to_main needs tensors with one row count, got "
                         f"{ {name: tuple(value.shape) for name, value in tensors.items()} }")
    infos = all_gather_object({"count": counts_here.pop(), "info": info})
    counts = [item["count"] for item in infos]
    gathered = {name: gather_rows(value, counts) for name, value in sorted(tensors.items())}
    if get_rank() != 0:
        return None
    return gathered, [item["info"] for item in infos]
