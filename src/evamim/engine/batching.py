"""Splitting a batch into micro-batches (gradient accumulation) and finding its size (throughput).

A batch is any nesting of dicts, tuples/lists (including namedtuples) and leaves:
- a tensor with a dim 0 is per-sample: one row per sample;
- a list/tuple of plain values (str, bytes, int, float, bool, None: e.g. captions, file names) is
  per-sample too, one entry per sample, and is split like a tensor;
- a :class:`PerSample` list holds one object of any structure per sample (images of different sizes,
  detection targets) and is split like a tensor;
- any other leaf (a number, a string on its own, a 0-d tensor) is per-batch, shared by every
  micro-batch unchanged.
Every per-sample entry must hold exactly batch-size entries: one of another length is refused with
its name, never guessed to be per-batch (a per-batch value belongs in a scalar, or outside the batch).
"""

from __future__ import annotations

from typing import Any

import torch

_SAMPLE_VALUES = (str, bytes, int, float, bool, type(None))


class PerSample(list):
    """A list with one entry per sample, whatever each entry holds (a (3, h, w) image of its own size, a dict of
    target tensors): per-sample as a whole, never looked into."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return PerSample(item) if isinstance(index, slice) else item


def _is_sample_sequence(obj) -> bool:
    return isinstance(obj, PerSample) or (isinstance(obj, (list, tuple)) and not _is_namedtuple(obj) and all(
        isinstance(item, _SAMPLE_VALUES) for item in obj
    ))


def _is_namedtuple(obj) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _per_sample_lengths(batch, where: str, found: list[tuple[str, int]]) -> None:
    """Append ``(name, length)`` of every per-sample entry below ``batch``; names read like ``batch['images']``."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim > 0:  # a 0-d tensor is per-batch (e.g. a temperature), not per-sample
            found.append((where, batch.shape[0]))
    elif _is_sample_sequence(batch):
        found.append((where, len(batch)))
    elif isinstance(batch, dict):
        for key, value in batch.items():
            _per_sample_lengths(value, f"{where}[{key!r}]", found)
    elif isinstance(batch, (list, tuple)):
        for index, value in enumerate(batch):
            _per_sample_lengths(value, f"{where}[{index}]", found)


def infer_batch_size(batch: Any) -> int:
    """Number of samples in ``batch``: the common length of its per-sample entries (see the module docstring).

    Raises:
        ValueError: the batch has no per-sample entry, or its entries have different lengths (each is named).
    """
    found: list[tuple[str, int]] = []
    _per_sample_lengths(batch, "batch", found)
    if not found:
        raise ValueError(
            f"cannot tell the batch size of a {type(batch).__name__} with no tensors or per-sample lists; "
            "pass batch_size_fn to the trainer"
        )
    lengths = sorted({length for _, length in found})
    if len(lengths) > 1:
        # The most common length is the likely batch size; name the entries that disagree with it.
        counts = {length: sum(1 for _, n in found if n == length) for length in lengths}
        size = max(lengths, key=lambda length: (counts[length], length))
        odd = ", ".join(f"{name} has {length}" for name, length in found if length != size)
        raise ValueError(
            f"the batch's entries have different lengths {lengths}: most hold {size} entries but {odd}. Every "
            "tensor and list in a batch must hold one entry per sample; put a per-batch value in a scalar or "
            "leave it out of the batch"
        )
    return lengths[0]


def _split(batch, size: int, parts: int) -> list:
    if isinstance(batch, torch.Tensor) and batch.ndim > 0:
        return list(batch.split(size))
    if _is_sample_sequence(batch):
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

    Raises ``ValueError`` if an entry's length differs from the batch size (see ``infer_batch_size``) or the
    batch size is not divisible by ``parts`` (equal micro-batches are what make the accumulated gradient of
    mean losses equal to the full-batch gradient).
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
