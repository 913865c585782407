"""Splitting a batch into micro-batches (gradient accumulation) and finding its size (throughput).

A batch is any nesting of dicts, tuples/lists (including namedtuples) and leaves:
- tensors (with a dim 0) are per-sample and all have the same length: the batch size;
- a list/tuple of plain values (str, int, float, bool, None: e.g. captions, file names) of that length
  is per-sample too and is split like a tensor; one of another length is per-batch bookkeeping (e.g. a
  loader's list of files that failed while the batch was made) and is shared unchanged. With no tensors
  at all, the plain sequences define the batch size and must agree;
- any other leaf (a number, a string on its own) is shared by every micro-batch unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

_SAMPLE_VALUES = (str, bytes, int, float, bool, type(None))


def _is_sample_sequence(obj) -> bool:
    return isinstance(obj, (list, tuple)) and not _is_namedtuple(obj) and len(obj) > 0 and all(
        isinstance(item, _SAMPLE_VALUES) for item in obj
    )


def _is_namedtuple(obj) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _leaf_lengths(batch, tensors: list[int], sequences: list[int]) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.ndim > 0:  # a 0-d tensor is per-batch (e.g. a temperature), not per-sample
            tensors.append(batch.shape[0])
    elif _is_sample_sequence(batch):
        sequences.append(len(batch))
    elif isinstance(batch, dict):
        for value in batch.values():
            _leaf_lengths(value, tensors, sequences)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _leaf_lengths(value, tensors, sequences)


def infer_batch_size(batch: Any) -> int:
    """Number of samples in ``batch``: the common dim 0 of its tensors, or of its plain sequences when it has
    no tensors (see the module docstring)."""
    tensors: list[int] = []
    sequences: list[int] = []
    _leaf_lengths(batch, tensors, sequences)
    lengths = tensors or sequences
    if not lengths:
        raise ValueError(
            f"cannot tell the batch size of a {type(batch).__name__} with no tensors or per-sample lists; "
            "pass batch_size_fn to the trainer"
        )
    if len(set(lengths)) != 1:
        kind = "tensors" if tensors else "per-sample lists"
        raise ValueError(f"the batch's {kind} have different lengths {sorted(set(lengths))}")
    return lengths[0]


def _split(batch, size: int, parts: int) -> list:
    if isinstance(batch, torch.Tensor) and batch.ndim > 0:
        return list(batch.split(size))
    if _is_sample_sequence(batch) and len(batch) == size * parts:
        return [batch[i * size:(i + 1) * size] for i in range(parts)]
    if isinstance(batch, dict):
        split_values = {key: _split(value, size, parts) for key, value in batch.items()}
        return [type(batch)((key, values[i]) for key, values in split_values.items()) for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        columns = [_split(value, size, parts) for value in batch]
        rows = [[column[i] for column in columns] for i in range(parts)]
        if _is_namedtuple(batch):
            return [type(batch)(*row) for row in rows]
        return [type(batch)(row) for row in rows]
    return [batch] * parts


def split_batch(batch: Any, parts: int) -> list:
    """Split ``batch`` into ``parts`` equal micro-batches along the sample dimension.

    Raises ``ValueError`` if the batch size is not divisible by ``parts`` (equal micro-batches are what make
    the accumulated gradient of mean losses equal to the full-batch gradient).
    """
    if parts < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {parts}")
    if parts == 1:
        return [batch]
    size = infer_batch_size(batch)
    if size % parts:
        lower, upper = size // parts * parts, (size // parts + 1) * parts
        raise ValueError(
            f"batch size {size} is not divisible by grad_accum_steps={parts}: set the per-step batch size to a "
            f"multiple of {parts} (e.g. {lower or upper} or {upper}), or choose a grad_accum_steps that divides {size}"
        )
    return _split(batch, size // parts, parts)
