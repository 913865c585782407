"""Extracting features: a frozen backbone over an evaluation loader, on one process or many.

A ``FeatureSet`` stores the parts (cls tokens of the last K blocks, the average) once and builds any
feature choice (:mod:`evamim.features.choices`) from them on demand.

Extraction runs under ``no_grad`` (not ``inference_mode``: the linear probe trains on these tensors)
and autocast at the task's ``precision``. With ``torch.distributed`` initialised every rank extracts
its share of an evaluation loader (which neither shuffles nor pads) and rank 0 gathers the rows and
orders them by dataset index.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from evamim.dtypes import dtype_of
from evamim.engine.distributed import gather_to_main, get_rank, get_world_size
from evamim.features.choices import FeatureRequest, blocks_of, compute_parts, parse_feature

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""The values of a task's ``precision`` (the backbone's autocast dtype); ``auto``: bf16 on CUDA, fp32 on CPU."""


@dataclass
class FeatureSet:
    """Features of a dataset, rows ordered by dataset index (map-style) or shard key (shards).

    ``block_cls`` (N, K, C) float32 or None; ``avg`` (N, C) float32 or None; ``labels`` (N,) long or None;
    ``indices`` (N,) long dataset indices; ``paths`` N strings (file paths, synthetic ids or shard keys);
    ``missing``: samples of the dataset that could not be read and have no row.
    """

    block_cls: torch.Tensor | None
    avg: torch.Tensor | None
    labels: torch.Tensor | None
    indices: torch.Tensor
    paths: list[str]
    missing: int = 0

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def request(self) -> FeatureRequest:
        return FeatureRequest(0 if self.block_cls is None else self.block_cls.shape[1], self.avg is not None)

    def get(self, spec: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feature choice ``spec`` as (N, D) float32 (or only ``rows``, a (R,) index tensor)."""
        pieces = []
        for part in parse_feature(spec):
            if part == "avg":
                if self.avg is None:
                    raise ValueError(f"feature {spec!r} needs 'avg', which was not extracted")
                pieces.append(self.avg if rows is None else self.avg[rows])
                continue
            blocks = blocks_of(part)
            have = 0 if self.block_cls is None else self.block_cls.shape[1]
            if blocks > have:
                raise ValueError(f"feature {spec!r} needs the cls tokens of {blocks} blocks; {have} were extracted")
            taken = self.block_cls[:, have - blocks :] if rows is None else self.block_cls[rows, have - blocks :]
            pieces.append(taken.flatten(1))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def select(self, rows: torch.Tensor) -> "FeatureSet":
        """The subset ``rows`` (a (R,) long tensor of row positions), in that order."""
        rows = rows.long()
        return FeatureSet(
            block_cls=None if self.block_cls is None else self.block_cls[rows],
            avg=None if self.avg is None else self.avg[rows],
            labels=None if self.labels is None else self.labels[rows],
            indices=self.indices[rows],
            paths=[self.paths[i] for i in rows.tolist()],
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"indices": self.indices.contiguous()}
        for name in ("block_cls", "avg", "labels"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.contiguous()
        return out


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for (train, val): ``round(fraction * n_c)`` rows of each class c go to val, drawn by ``seed``.

    labels (N,) long -> two sorted (N_train,), (N_val,) long tensors of row positions. A class with at
    least 2 rows keeps at least one on each side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    val_rows = []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        count = len(rows)
        take = min(max(round(fraction * count), 1 if count >= 2 else 0), count - 1 if count >= 2 else 0)
        val_rows.append(rows[torch.randperm(count, generator=generator)[:take]])
    val = torch.sort(torch.cat(val_rows)).values
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val] = True
    return torch.nonzero(~is_val).flatten(), val


# -------------------------------------------------------------------------------------- extraction
def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision``: ``auto`` -> bf16 on CUDA, fp32 elsewhere; else fp32 / bf16 / fp16."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return dtype_of(name)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(loader: Any, desc: str, enabled: bool):
    """A tqdm bar over ``loader`` on a terminal only (as the training loop's): in a log file a bar is a stream of
    carriage returns."""
    from tqdm.auto import tqdm

    from evamim.engine.progress import stderr_is_terminal

    try:
        total = len(loader)
    except TypeError:  # shards without data.samples_per_epoch: length unknown
        total = None
    return tqdm(loader, total=total, desc=desc, unit="batch", dynamic_ncols=True,
                disable=not (enabled and stderr_is_terminal()))


@dataclass
class _Local:
    """One rank's extracted rows, in the order its loader delivered them."""

    parts: dict[str, list[torch.Tensor]]
    labels: list[torch.Tensor]
    indices: list[torch.Tensor]
    keys: list[str]
    num_bad: int = 0


def features_from_batches(
    model: nn.Module,
    batches: Iterable[dict],
    request: FeatureRequest,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Iterable[tuple[dict[str, torch.Tensor], dict]]:
    """Yield ``(parts, batch)`` per batch: parts as in ``compute_parts``, float32 on ``device``, no grad."""
    model.eval()
    for batch in batches:
        images = batch["images"].to(device, non_blocking=True)
        with torch.no_grad(), _autocast(device, dtype):
            parts = compute_parts(model, images, request)
        yield {name: value.float() for name, value in parts.items()}, batch


def _extract_local(model, loader, request, device, dtype, progress: bool, desc: str) -> _Local:
    local = _Local(parts={}, labels=[], indices=[], keys=[])
    # Failures stay in the loader (batches carry samples only): count those met during this pass.
    bad_before = _bad_samples(loader)
    batches = _progress(loader, desc, progress)
    for parts, batch in features_from_batches(model, batches, request, device=device, dtype=dtype):
        for name, value in parts.items():
            local.parts.setdefault(name, []).append(value.cpu())
        if "labels" in batch:
            local.labels.append(batch["labels"].long())
        if "indices" in batch:
            local.indices.append(batch["indices"].long())
        local.keys.extend(batch.get("keys", ()))
    local.num_bad = _bad_samples(loader) - bad_before
    return local


def _bad_samples(loader: Any) -> int:
    totals = getattr(loader, "bad_sample_totals", None)
    return int(totals()["samples_bad"]) if callable(totals) else 0


def _stack(pieces: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(pieces) if pieces else torch.empty(empty_shape, dtype=dtype)


def _local_tensors(local: _Local, request: FeatureRequest, embed_dim: int, with_labels: bool) -> dict[str, torch.Tensor]:
    """The rank's rows as tensors a gather can pad (rows first); correctly shaped empty ones when it got no data."""
    out = {}
    if request.num_blocks:
        out["block_cls"] = _stack(local.parts.get("block_cls", []), (0, request.num_blocks, embed_dim), torch.float32)
    if request.avg:
        out["avg"] = _stack(local.parts.get("avg", []), (0, embed_dim), torch.float32)
    if with_labels:
        out["labels"] = _stack(local.labels, (0,), torch.long)
    # Shard samples have keys, not indices: their position on this rank stands in until they are sorted by key.
    out["indices"] = _stack(local.indices, (0,), torch.long) if local.indices else torch.arange(len(local.keys))
    return out


def extract_features(
    model: nn.Module,
    loader: Any,
    request: FeatureRequest,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet | None:
    """Run the frozen ``model`` over an evaluation ``loader`` (an ``evamim.data.loader.Loader``).

    Returns the ``FeatureSet`` with rows ordered by dataset index (map-style; a sample delivered twice
    because an unreadable file was replaced by its neighbour is kept once) or by shard key (shards).
    With ``torch.distributed`` initialised this is a collective: every rank extracts its share and rank 0
    gets the gathered set; the other ranks get None.
    """
    request.check(model)
    distributed = get_world_size() > 1
    is_main = get_rank() == 0
    with_labels = bool(getattr(loader.dataset, "labels", False))
    local = _extract_local(model, loader, request, device, dtype, progress and is_main, desc)
    tensors = _local_tensors(local, request, model.embed_dim, with_labels)
    keys, num_bad = local.keys, local.num_bad
    if distributed:
        gathered = gather_to_main(tensors, {"keys": keys, "num_bad": num_bad})
        if gathered is None:
            return None
        tensors, infos = gathered
        keys = [key for info in infos for key in info["keys"]]
        num_bad = sum(info["num_bad"] for info in infos)
    return _assemble(tensors, keys, loader, num_bad)


def _assemble(tensors: dict[str, torch.Tensor], keys: list[str], loader: Any, num_bad: int) -> FeatureSet:
    """Order the rows (by dataset index, or by shard key), drop repeated indices and name every row."""
    if loader.is_map_style:
        indices = tensors["indices"]
        order = torch.sort(indices, stable=True).indices
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = indices[order][1:] != indices[order][:-1]
        rows = order[first]
        missing = len(loader.dataset) - int(rows.numel())
        paths = [loader.dataset.source.describe(i) for i in indices[rows].tolist()]
        row_indices = indices[rows]
    else:
        rows = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
        paths = [keys[i] for i in rows.tolist()]
        row_indices = torch.arange(len(paths))
        missing = num_bad
    if missing:
        logger.warning("%d samples could not be read and are left out (see the evamim.data warnings)", missing)
    take = {name: value[rows] for name, value in tensors.items() if name != "indices"}
    return FeatureSet(
        block_cls=take.get("block_cls"),
        avg=take.get("avg"),
        labels=take.get("labels"),
        indices=row_indices,
        paths=paths,
        missing=missing,
    )
