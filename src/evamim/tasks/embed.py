"""``evamim embed``: embeddings of a folder, a list file or shards, written to .npy or .safetensors.

Output in ``output_dir`` (row i of every file is the same image):

- ``embeddings.npy`` (N, D) or ``embeddings.safetensors`` with ``embeddings`` (N, D), ``indices`` (N,)
  and, when ``data.labels`` is on, ``labels`` (N,);
- ``labels.npy`` (N,) with ``format=npy`` and labels on;
- ``paths.txt``: one image path per line (shards: the sample key), in row order;
- ``results.json`` and ``config.yaml``.

Rows follow the dataset order (sorted paths for a folder, line order for a list file, key order for
shards). Images that cannot be read are skipped, reported in the log and counted in results.json.
Images go through the evaluation transform (resize to ``image_size / crop_pct``, centre crop).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evamim.config import ConfigError
from evamim.data.config import DataConfig
from evamim.engine.distributed import is_main_process
from evamim.features.choices import FeatureRequest, check_features
from evamim.features.extract import FeatureSet, resolve_precision
from evamim.features.pipeline import check_model_and_data, features_for, prepare_backbone
from evamim.tasks.command import add_config_arguments, run_config_command
from evamim.tasks.common import ModelSection, format_table, output_dirs_problems, write_results
from evamim.tasks.runner import evaluation_process

logger = logging.getLogger(__name__)

FORMATS = ("npy", "safetensors")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class EmbedConfig:
    """``evamim embed``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    """The images: ``data.source`` (folder, list, shards), ``data.path``, ``data.image_size``; ``data.labels``
    to also save labels."""
    features: str = "cls"
    """cls, avg, cls+avg, lastN, last4+avg, ... (see docs/evaluation.md)."""
    normalize: bool = False
    """L2-normalise every embedding (for cosine retrieval)."""
    format: str = "npy"
    """``npy`` or ``safetensors``."""
    save_dtype: str = "float32"
    """``float32`` or ``float16`` (half the size)."""
    batch_size: int = 256
    output_dir: str = "runs/embed"
    device: str = "auto"
    precision: str = "auto"
    """Autocast dtype of the backbone: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."""
    seed: int = 0
    """Seeds a randomly initialised backbone (no ``model.pretrained``)."""
    progress: bool = True


def validate(config: EmbedConfig) -> None:
    problems: list[str] = []
    check_model_and_data(config.model, config.data, config.precision, problems, needs_labels=False)
    check_features([config.features], problems)
    if config.format not in FORMATS:
        problems.append(f"format must be one of {', '.join(FORMATS)}, got {config.format!r}")
    if config.save_dtype not in SAVE_DTYPES:
        problems.append(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {config.save_dtype!r}")
    if config.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {config.batch_size}")
    problems += output_dirs_problems(config.output_dir)
    if problems:
        raise ConfigError("invalid embed config:\n  " + "\n  ".join(problems))


def save_embeddings(features: FeatureSet, spec: str, output_dir: str | Path, *, fmt: str = "npy",
                    save_dtype: str = "float32", normalize: bool = False) -> dict[str, str]:
    """Write the embeddings of choice ``spec`` (N, D), the paths and the labels; returns {what: file}."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    embeddings = features.get(spec)
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    embeddings = embeddings.to(SAVE_DTYPES[save_dtype]).contiguous()
    bad = [path for path in features.paths if "\n" in path or "\r" in path]
    if bad:
        raise ValueError(f"{len(bad)} paths contain a line break (e.g. {bad[0]!r}); paths.txt holds one path per line")
    files = {"paths": str(output_dir / "paths.txt")}
    Path(files["paths"]).write_text("".join(f"{path}\n" for path in features.paths), encoding="utf-8")
    if fmt == "npy":
        files["embeddings"] = str(output_dir / "embeddings.npy")
        np.save(files["embeddings"], embeddings.numpy())
        if features.labels is not None:
            files["labels"] = str(output_dir / "labels.npy")
            np.save(files["labels"], features.labels.numpy())
        return files
    from safetensors.torch import save_file

    tensors = {"embeddings": embeddings, "indices": features.indices.contiguous()}
    if features.labels is not None:
        tensors["labels"] = features.labels.contiguous()
    files["embeddings"] = str(output_dir / "embeddings.safetensors")
    save_file(tensors, files["embeddings"], metadata={"features": spec, "normalized": str(normalize)})
    return files


def run_embed(config: EmbedConfig) -> dict[str, Any] | None:
    """Extract and write the embeddings; returns the results dict on rank 0, None on the other ranks."""
    validate(config)
    with evaluation_process(config.device) as device:
        return _run(config, device)


def _run(config: EmbedConfig, device: torch.device) -> dict[str, Any] | None:
    try:
        dtype = resolve_precision(config.precision, device)
        model = prepare_backbone(config.model, config.data.image_size, device, config.seed)
        request = FeatureRequest.for_features([config.features])
        request.check(model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    features, _ = features_for(model, config.data, request, device=device, dtype=dtype, batch_size=config.batch_size,
                               cache_dir=None, tag="embed", progress=config.progress)
    if not is_main_process():
        return None
    try:
        files = save_embeddings(features, config.features, config.output_dir, fmt=config.format,
                                save_dtype=config.save_dtype, normalize=config.normalize)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    results = {
        "task": "embed",
        "num_images": len(features),
        "missing": features.missing,
        "dim": int(features.get(config.features).shape[1]),
        "features": config.features,
        "normalized": config.normalize,
        "files": files,
    }
    write_results(config.output_dir, config, results)
    print(format_table([{"images": len(features), "dim": results["dim"], "features": config.features,
                         "file": files["embeddings"]}]))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None,
                         "model.pretrained=runs/pretrain/model data.source=folder data.path=/photos format=safetensors")


def run(args: argparse.Namespace) -> int:
    return run_config_command("embed", EmbedConfig, run_embed, args)[0]
