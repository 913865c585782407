"""The feature cache: features are extracted once per backbone, data and feature request, then reused.

Layout: ``<cache_dir>/<tag>-<fingerprint[:16]>.safetensors`` (the parts, labels and dataset indices)
plus a ``.json`` of the paths; the fingerprint hashes the backbone's config and weights, the data
settings that change pixels, the list of samples, the parts and the autocast dtype. A run with any of
those changed gets another fingerprint, so a stale entry is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evamim import atomic
from evamim.features.choices import FeatureRequest
from evamim.features.extract import FeatureSet

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
# DataConfig fields that change which pixels an evaluation loader produces (the rest only change speed);
# the synthetic ones matter only for the synthetic source.
EVAL_DATA_FIELDS = (
    "source", "path", "image_size", "crop_pct", "interpolation", "mean", "std", "jpeg_draft", "labels", "max_image_pixels",
)
SYNTHETIC_DATA_FIELDS = ("seed", "synthetic_size", "synthetic_resolution", "synthetic_world")


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
    metadata = {"fingerprint": fingerprint, "format": str(CACHE_FORMAT)}
    atomic.write_with(tensor_path, lambda tmp: save_file(features.tensors(), str(tmp), metadata=metadata))
    record = {
        "fingerprint": fingerprint,
        "format": CACHE_FORMAT,
        "num_samples": len(features),
        "missing": features.missing,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **(about or {}),
        "paths": features.paths,
    }
    atomic.write_json(json_path, record, indent=None)
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
