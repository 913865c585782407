"""From an evaluation task's config to feature sets: the frozen backbone, the checks every such task
shares, and the training and validation features (from the cache when it has them)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evamim.engine.distributed import broadcast_from_main, is_main_process
from evamim.features.cache import cache_paths, feature_fingerprint, load_cache, save_cache
from evamim.features.choices import FeatureRequest
from evamim.features.extract import PRECISIONS, FeatureSet, extract_features, holdout_split
from evamim.features.val_data import ValDataSection, check_same_classes, val_data_config

logger = logging.getLogger(__name__)


def check_model_and_data(model: Any, data: Any, precision: str, problems: list[str], *, needs_labels: bool) -> None:
    """Append messages for problems every evaluation task shares: ``model.*``, the data labels, ``precision``."""
    from evamim.models.presets import list_models

    if model.pretrained is None and model.name is None:
        problems.append("model: set model.pretrained (an evamim model directory or weights file) and/or model.name")
    if model.pretrained is not None and not Path(model.pretrained).exists():
        problems.append(f"model.pretrained: {model.pretrained} does not exist")
    if model.name is not None and model.name not in list_models():
        problems.append(f"model.name {model.name!r} is not a preset; choose one of {list_models()}")
    if data.source == "synthetic" and data.path:
        problems.append(
            f"data.path={data.path!r} is set but data.source is 'synthetic' (the default), which ignores it: "
            "set data.source=folder, list or shards"
        )
    if needs_labels and not data.labels:
        problems.append("data.labels must be true: this task needs class labels (class sub-folders, `path label` lines or shard `cls`)")
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def backbone_for_features(config: Any, device: torch.device) -> tuple[nn.Module, FeatureRequest, torch.dtype]:
    """(frozen backbone, what to extract for ``config.features``, autocast dtype) of a feature task's config
    (``model``, ``data.image_size``, ``features``, ``precision``, ``seed``); a ConfigError says what is wrong."""
    from evamim.config import ConfigError
    from evamim.features.extract import resolve_precision

    try:
        dtype = resolve_precision(config.precision, device)
        model = prepare_backbone(config.model, config.data.image_size, device, config.seed)
        request = FeatureRequest.for_features(config.features)
        request.check(model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return model, request, dtype


def prepare_backbone(section: Any, image_size: int, device: torch.device, seed: int) -> nn.Module:
    """Load the backbone a task's ``model.*`` section names (random init drawn from ``seed``), frozen, in
    eval mode, on ``device``.

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
            f"set data.image_size={config.img_size[0]}, or model.options.img_size={image_size} to resample its "
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
