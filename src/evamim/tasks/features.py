"""Features of a frozen backbone for the evaluation tasks (kNN, linear probe, embed).

Feature choices (a string; parts joined by ``+`` are concatenated in the order written):

- ``cls``: the cls token after the model's final LayerNorm, (N, C).
- ``avg``: the mean of the patch tokens, normalised as the model defines it: ``fc_norm(mean(x))`` in a
  model with ``fc_norm`` (``global_pool='avg'``), ``mean(norm(x))`` otherwise, (N, C).
- ``lastN`` (e.g. ``last4``): the cls tokens of the last N blocks, each through the final LayerNorm,
  oldest block first, (N, N*C); DINO's ``n_last_blocks``. ``last1`` is ``cls``.
- e.g. ``cls+avg`` (N, 2C), or ``last4+avg`` (DINO's ``n_last_blocks=4, avgpool=True``).

"The final LayerNorm" is ``model.norm`` when the model has one, else ``model.fc_norm``: a model built
with ``global_pool='avg'`` keeps its only final LayerNorm in ``fc_norm`` (and loading an EVA MIM
checkpoint puts that checkpoint's ``norm`` there), so ``cls`` is normalised in every model.

Every choice comes from one backbone forward: ``forward_intermediates`` on the last blocks gives the
cls tokens of those blocks and the patch tokens of the last one. A ``FeatureSet`` stores the parts
(cls tokens of the last K blocks, the average) once and builds any choice from them on demand.

Extraction runs under ``no_grad`` (not ``inference_mode``: the linear probe trains on these tensors)
and autocast. With ``torch.distributed`` initialised every rank extracts its share of an evaluation
loader (which neither shuffles nor pads) and rank 0 gathers the rows and orders them by dataset index.

Cache: ``<cache_dir>/<tag>-<fingerprint[:16]>.safetensors`` (the parts, labels and dataset indices)
plus a ``.json`` of the paths; the fingerprint hashes the backbone's config and weights, the data
settings that change pixels, the list of samples, the parts and the autocast dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

FEATURE_CHOICES_HELP = (
    "cls, avg, lastN (the cls tokens of the last N blocks, e.g. last4), or parts joined by '+' "
    "(e.g. cls+avg, last4+avg)"
)
DTYPES = ("auto", "fp32", "bf16", "fp16")
CACHE_FORMAT = 1
# Rows are gathered in pieces of about this many bytes, so a rank never stages its whole share at once.
GATHER_CHUNK_BYTES = 256 << 20
# DataConfig fields that change which pixels an evaluation loader produces (the rest only change speed);
# the synthetic ones matter only for the synthetic source.
EVAL_DATA_FIELDS = (
    "source", "path", "image_size", "crop_pct", "interpolation", "mean", "std", "jpeg_draft", "labels", "max_image_pixels",
)
SYNTHETIC_DATA_FIELDS = ("seed", "synthetic_size", "synthetic_resolution")
_LAST = re.compile(r"last(\d+)")


# ------------------------------------------------------------------------------------------ choices
def parse_feature(spec: str) -> tuple[str, ...]:
    """``'last4+avg'`` -> ``('last4', 'avg')``; ``lastN`` with N=1 becomes ``cls``.

    Raises:
        ValueError: an unknown part, listing the valid choices, or a part given twice.
    """
    parts = []
    for raw in str(spec).split("+"):
        part = raw.strip()
        match = _LAST.fullmatch(part)
        if match and int(match.group(1)) >= 1:
            part = "cls" if int(match.group(1)) == 1 else f"last{int(match.group(1))}"
        elif part not in ("cls", "avg"):
            raise ValueError(f"unknown feature choice {spec!r} (part {raw!r}); valid: {FEATURE_CHOICES_HELP}")
        if part in parts:
            raise ValueError(f"feature choice {spec!r} names {part!r} twice")
        parts.append(part)
    return tuple(parts)


def _blocks_of(part: str) -> int:
    return 1 if part == "cls" else int(part[4:]) if part.startswith("last") else 0


@dataclass(frozen=True)
class FeatureRequest:
    """What one extraction pass keeps: the cls tokens of the last ``num_blocks`` blocks and/or the average."""

    num_blocks: int = 1
    avg: bool = False

    @classmethod
    def for_features(cls, specs: Iterable[str]) -> "FeatureRequest":
        """The smallest request that serves every choice in ``specs`` (raises ValueError on a bad choice)."""
        parts = [part for spec in specs for part in parse_feature(spec)]
        if not parts:
            raise ValueError(f"no feature choice given; valid: {FEATURE_CHOICES_HELP}")
        return cls(num_blocks=max(_blocks_of(p) for p in parts), avg="avg" in parts)

    def check(self, model: nn.Module) -> None:
        """Raise ValueError when the model has fewer blocks than the request needs."""
        depth = len(model.blocks)
        if self.num_blocks > depth:
            raise ValueError(f"feature choice last{self.num_blocks} needs {self.num_blocks} blocks; the backbone has {depth}")


def feature_dim(spec: str, embed_dim: int) -> int:
    """Width of a feature choice for a backbone of width ``embed_dim``."""
    return sum(max(_blocks_of(part), 1) * embed_dim for part in parse_feature(spec))


# ------------------------------------------------------------------------------------- one forward
def final_layer_norm(model: nn.Module) -> nn.Module:
    """The model's final LayerNorm: ``norm``, or ``fc_norm`` in models that normalise after pooling."""
    return model.norm if not isinstance(model.norm, nn.Identity) else model.fc_norm


def compute_parts(model: nn.Module, images: torch.Tensor, request: FeatureRequest) -> dict[str, torch.Tensor]:
    """One backbone forward -> ``{"block_cls": (B, K, C), "avg": (B, C)}`` (keys as requested).

    ``block_cls[:, -1]`` is the cls token of the last block, ``block_cls[:, -K]`` that of block depth-K;
    all after the final LayerNorm. Runs in the caller's grad/autocast context.
    """
    blocks = max(request.num_blocks, 1)
    outputs = model.forward_intermediates(
        images, blocks, norm=False, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
    )
    parts: dict[str, torch.Tensor] = {}
    if request.num_blocks:
        final_norm = final_layer_norm(model)
        parts["block_cls"] = torch.stack([final_norm(prefix[:, 0]) for _, prefix in outputs], dim=1)
    if request.avg:
        patches = outputs[-1][0]  # (B, N, C) last block, before any final norm
        if model.config.fc_norm:
            parts["avg"] = model.fc_norm(patches.mean(dim=1))
        else:
            parts["avg"] = model.norm(patches).mean(dim=1)
    return parts


# ------------------------------------------------------------------------------------- feature sets
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
            blocks = _blocks_of(part)
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
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; else fp32 / bf16 / fp16."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(loader: Any, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    try:
        total = len(loader)
    except TypeError:  # shards without data.samples_per_epoch: length unknown
        total = None
    return tqdm(loader, total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=not enabled)


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
    batches = _progress(loader, desc, progress)
    for parts, batch in features_from_batches(model, batches, request, device=device, dtype=dtype):
        for name, value in parts.items():
            local.parts.setdefault(name, []).append(value.cpu())
        if "labels" in batch:
            local.labels.append(batch["labels"].long())
        if "indices" in batch:
            local.indices.append(batch["indices"].long())
        local.keys.extend(batch.get("keys", ()))
        local.num_bad += int(batch.get("num_bad", 0))
    return local


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
    import torch.distributed as dist

    request.check(model)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    is_main = not distributed or dist.get_rank() == 0
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


# ------------------------------------------------------------------------------------- distributed
def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor | None:
    """Every rank's rows of ``tensor`` (n_rank, ...) concatenated in rank order, on rank 0 (None elsewhere).

    A collective; ``counts`` (every rank's n_rank, known on all ranks) sets the padding. Rows travel
    in padded pieces of about ``GATHER_CHUNK_BYTES`` on the backend's device.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    device = _comm_device()
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


def gather_to_main(tensors: dict[str, torch.Tensor], info: Any) -> tuple[dict[str, torch.Tensor], list] | None:
    """Gather named row tensors (same row count within a rank) and a small picklable ``info`` per rank.

    Returns ``(tensors concatenated in rank order, [info of rank 0, rank 1, ...])`` on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    count = int(tensors["indices"].shape[0])
    infos: list = [None] * dist.get_world_size()
    dist.all_gather_object(infos, {"count": count, "info": info})
    counts = [item["count"] for item in infos]
    gathered = {name: gather_rows(value, counts) for name, value in sorted(tensors.items())}
    if dist.get_rank() != 0:
        return None
    return gathered, [item["info"] for item in infos]


def is_main_process() -> bool:
    from evamim.engine.distributed import is_main_process as engine_is_main

    return engine_is_main()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective when distributed; the value itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# -------------------------------------------------------------------------------------------- cache
def weights_digest(model: nn.Module) -> str:
    """blake2b over every state-dict entry's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no second copy of big models
    return digest.hexdigest()


def dataset_identity(loader: Any) -> dict[str, Any]:
    """The list of samples the loader reads (hashed), without reading any image."""
    dataset = loader.dataset
    if loader.is_map_style:
        digest = hashlib.blake2b(digest_size=20)
        for index in range(len(dataset)):
            digest.update(dataset.source.describe(index).encode() + b"\0")
        return {"samples": len(dataset), "names": digest.hexdigest()}
    return {"shards": list(dataset.urls)}


def _data_fields(data_cfg: Any) -> tuple[str, ...]:
    return EVAL_DATA_FIELDS + (SYNTHETIC_DATA_FIELDS if data_cfg.resolve_source() == "synthetic" else ())


def feature_fingerprint(model: nn.Module, data_cfg: Any, loader: Any, request: FeatureRequest, dtype: torch.dtype) -> str:
    """A hex digest that changes whenever the cached features would: backbone, pixels, samples, parts, dtype."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    description = {
        "format": CACHE_FORMAT,
        "model": config,
        "weights": weights_digest(model),
        "data": {name: getattr(data_cfg, name) for name in _data_fields(data_cfg)},
        "dataset": dataset_identity(loader),
        "request": dataclasses.asdict(request),
        "dtype": str(dtype),
    }
    text = json.dumps(description, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_paths(cache_dir: str | Path, tag: str, fingerprint: str) -> tuple[Path, Path]:
    stem = f"{tag}-{fingerprint[:16]}"
    return Path(cache_dir) / f"{stem}.safetensors", Path(cache_dir) / f"{stem}.json"


def save_cache(features: FeatureSet, cache_dir: str | Path, tag: str, fingerprint: str, about: dict | None = None) -> Path:
    """Write the tensors, then the JSON (its presence marks a complete entry); both atomically."""
    from safetensors.torch import save_file

    tensor_path, json_path = cache_paths(cache_dir, tag, fingerprint)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    partial = tensor_path.with_suffix(".safetensors.partial")
    save_file(features.tensors(), str(partial), metadata={"fingerprint": fingerprint, "format": str(CACHE_FORMAT)})
    os.replace(partial, tensor_path)
    record = {
        "fingerprint": fingerprint,
        "format": CACHE_FORMAT,
        "num_samples": len(features),
        "missing": features.missing,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **(about or {}),
        "paths": features.paths,
    }
    partial_json = json_path.with_suffix(".json.partial")
    partial_json.write_text(json.dumps(record) + "\n")
    os.replace(partial_json, json_path)
    return tensor_path


def load_cache(cache_dir: str | Path, tag: str, fingerprint: str) -> FeatureSet | None:
    """The cached FeatureSet for ``fingerprint``, or None when there is none (or it is incomplete)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensor_path, json_path = cache_paths(cache_dir, tag, fingerprint)
    if not (tensor_path.exists() and json_path.exists()):
        return None
    record = json.loads(json_path.read_text())
    with safe_open(str(tensor_path), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("fingerprint")
    if record.get("fingerprint") != fingerprint or stored != fingerprint:
        logger.warning("feature cache %s does not match its fingerprint; extracting again", tensor_path)
        return None
    tensors = load_file(str(tensor_path))
    if len(record["paths"]) != tensors["indices"].shape[0]:
        logger.warning("feature cache %s is inconsistent (paths vs rows); extracting again", tensor_path)
        return None
    return FeatureSet(
        block_cls=tensors.get("block_cls"),
        avg=tensors.get("avg"),
        labels=tensors.get("labels"),
        indices=tensors["indices"],
        paths=list(record["paths"]),
        missing=int(record.get("missing", 0)),
    )


# ------------------------------------------------------------------------------------- for the tasks
@dataclass
class ValDataSection:
    """The validation set: ``data``'s settings with another path, or a held-out part of ``data``."""

    path: str = ""
    """Validation images (same source kind and settings as ``data`` unless ``source`` is set), e.g.
    an ImageFolder ``val/`` tree with the same class sub-folders as the training one."""
    source: str | None = None
    """``folder``, ``list``, ``shards`` or ``synthetic``; None = ``data.source``."""
    holdout: float = 0.0
    """Instead of ``path``: hold out this fraction of every class of ``data`` (drawn with ``data.seed``)."""

    def check(self, data: Any) -> list[str]:
        """Problems with this section (``data``: the training DataConfig), as messages that say what to change."""
        if self.holdout and self.path:
            return ["set val_data.path or val_data.holdout, not both"]
        if not self.path and not self.holdout:
            return ["no validation set: set val_data.path=<folder or list of labelled images>, or val_data.holdout=0.1"]
        if self.holdout and not 0 < self.holdout < 1:
            return [f"val_data.holdout must be in (0, 1), got {self.holdout}"]
        if self.path and (self.source or data.source) == "synthetic":
            return [
                f"val_data.path={self.path!r} is set but the validation source is 'synthetic', which ignores it: "
                "set data.source (or val_data.source) to folder, list or shards"
            ]
        return []


def val_data_config(data: Any, val: ValDataSection) -> Any:
    """``data`` with the validation path and source (every other setting shared, so both sets see the same pixels)."""
    return dataclasses.replace(data, path=val.path, source=val.source or data.source)


def check_features(specs: Sequence[str], problems: list[str], key: str = "features") -> None:
    """Append a message for each invalid feature choice in ``specs``."""
    if not specs:
        problems.append(f"{key} is empty; valid choices: {FEATURE_CHOICES_HELP}")
    for spec in specs:
        try:
            parse_feature(spec)
        except ValueError as error:
            problems.append(f"{key}: {error}")


def prepare_backbone(section: Any, image_size: int, device: torch.device, seed: int) -> nn.Module:
    """Load the backbone (random init drawn from ``seed``), frozen, in eval mode, on ``device``.

    Raises:
        ValueError: the model's input size differs from ``image_size`` (the message says which setting to change).
    """
    from evamim.tasks.common import load_backbone

    torch.manual_seed(seed)
    model = load_backbone(section)
    config = model.config
    if tuple(config.img_size) != (image_size, image_size) and not config.dynamic_img_size:
        raise ValueError(
            f"the backbone takes {config.img_size[0]}x{config.img_size[1]} images but data.image_size is {image_size}: "
            f"set data.image_size={config.img_size[0]}, or backbone.options.img_size={image_size} to resample its "
            "position embeddings"
        )
    model.requires_grad_(False)
    return model.eval().to(device)


def features_for(
    model: nn.Module,
    data_cfg: Any,
    request: FeatureRequest,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    cache_dir: str | Path | None,
    tag: str,
    progress: bool = True,
) -> tuple[FeatureSet | None, str]:
    """Features of ``data_cfg`` (evaluation transform), from the cache when its fingerprint matches.

    Returns ``(features, status)`` with status ``hit``, ``miss`` (extracted and saved) or ``off``
    (``cache_dir`` None). A collective when distributed: only rank 0 reads and writes the cache and gets
    the features; the other ranks get None.
    """
    from evamim.data.loader import build_loader

    loader = build_loader(data_cfg, batch_size=batch_size, purpose="eval")
    main = is_main_process()
    fingerprint = None
    if cache_dir is not None:
        cached = None
        if main:
            fingerprint = feature_fingerprint(model, data_cfg, loader, request, dtype)
            cached = load_cache(cache_dir, tag, fingerprint)
        if broadcast_from_main(cached is not None):
            if main:
                logger.info("%s features: cache hit %s", tag, cache_paths(cache_dir, tag, fingerprint)[0])
            return cached, "hit"
    started = time.perf_counter()
    features = extract_features(model, loader, request, device=device, dtype=dtype, progress=progress, desc=tag)
    if features is not None:
        logger.info("%s features: %d x %s in %.1f s", tag, len(features), _widths(features), time.perf_counter() - started)
    if features is not None and cache_dir is not None:
        about = {"tag": tag, "data_path": str(data_cfg.path), "source": data_cfg.source, "request": dataclasses.asdict(request)}
        path = save_cache(features, cache_dir, tag, fingerprint, about)
        logger.info("%s features cached in %s", tag, path)
    return features, ("off" if cache_dir is None else "miss")


def _widths(features: FeatureSet) -> str:
    shapes = [tuple(t.shape[1:]) for t in (features.block_cls, features.avg) if t is not None]
    return " + ".join(str(s) for s in shapes)


def resolve_cache_dir(cache: bool, cache_dir: str | None, output_dir: str) -> Path | None:
    """``cache_dir``, or ``<output_dir>/features`` when unset; None with ``cache=false``."""
    if not cache:
        return None
    return Path(cache_dir) if cache_dir else Path(output_dir) / "features"


__all__ = [
    "FEATURE_CHOICES_HELP",
    "FeatureRequest",
    "FeatureSet",
    "ValDataSection",
    "compute_parts",
    "extract_features",
    "feature_dim",
    "features_for",
    "final_layer_norm",
    "gather_rows",
    "holdout_split",
    "parse_feature",
]


def _class_folders(root: str) -> list[str]:
    # The folder source's rule: class = non-hidden sub-folder, index = position in sorted order.
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def check_same_classes(train_cfg: Any, val_cfg: Any) -> None:
    """Folder sources number classes by their sorted sub-folder names, so train and val must have the same ones.

    Raises:
        ValueError: the class folders differ (the message names the first differences).
    """
    if not (train_cfg.source == val_cfg.source == "folder" and train_cfg.labels):
        return
    if not (Path(train_cfg.path).is_dir() and Path(val_cfg.path).is_dir()):
        return  # the loader reports the missing folder with its path
    train, val = _class_folders(train_cfg.path), _class_folders(val_cfg.path)
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ValueError(
            f"the class folders of {val_cfg.path} ({len(val)}) differ from those of {train_cfg.path} ({len(train)}): "
            f"only in train {only_train[:5]}, only in val {only_val[:5]}. Class indices come from the sorted folder "
            "names, so both trees need the same class folders (an empty one is not allowed: use a list file)"
        )


def class_problems(data: Any, val_data: ValDataSection) -> list[str]:
    """``check_same_classes`` for a task's validate(): a list with the message, or empty."""
    if not val_data.path:
        return []
    try:
        check_same_classes(data, val_data_config(data, val_data))
    except ValueError as error:
        return [str(error)]
    return []


def train_val_features(
    model: nn.Module,
    data: Any,
    val_data: ValDataSection,
    request: FeatureRequest,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    cache_dir: Path | None,
    progress: bool = True,
) -> tuple[FeatureSet | None, FeatureSet | None, dict[str, str]]:
    """(train, val, cache status per set) from ``data`` and ``val_data`` (a path, or a held-out part of ``data``).

    A collective when distributed; the feature sets are None on ranks other than 0.
    """
    common = dict(device=device, dtype=dtype, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    if val_data.holdout:
        everything, status = features_for(model, data, request, tag="data", **common)
        if everything is None:
            return None, None, {"data": status}
        if everything.labels is None:
            raise ValueError("val_data.holdout needs labels: set data.labels=true")
        train_rows, val_rows = holdout_split(everything.labels, val_data.holdout, data.seed)
        train = dataclasses.replace(everything.select(train_rows), missing=everything.missing)
        return train, everything.select(val_rows), {"data": status}
    val_cfg = val_data_config(data, val_data)
    check_same_classes(data, val_cfg)
    train, train_status = features_for(model, data, request, tag="train", **common)
    val, val_status = features_for(model, val_cfg, request, tag="val", **common)
    return train, val, {"train": train_status, "val": val_status}


def check_backbone_and_data(backbone: Any, data: Any, dtype: str, problems: list[str], *, needs_labels: bool) -> None:
    """Append messages for problems every evaluation task shares: backbone, data labels, dtype."""
    from evamim.models.presets import list_models

    if backbone.pretrained is None and backbone.name is None:
        problems.append("backbone: set backbone.pretrained (an evamim model directory or weights file) and/or backbone.name")
    if backbone.pretrained is not None and not Path(backbone.pretrained).exists():
        problems.append(f"backbone.pretrained: {backbone.pretrained} does not exist")
    if backbone.name is not None and backbone.name not in list_models():
        problems.append(f"backbone.name {backbone.name!r} is not a preset; choose one of {list_models()}")
    if data.source == "synthetic" and data.path:
        problems.append(
            f"data.path={data.path!r} is set but data.source is 'synthetic' (the default), which ignores it: "
            "set data.source=folder, list or shards"
        )
    if needs_labels and not data.labels:
        problems.append("data.labels must be true: this task needs class labels (class sub-folders, `path label` lines or shard `cls`)")
    if dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
