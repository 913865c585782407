"""EvaClip weights in and out: the native directory, and the vision tower from any checkpoint evamim reads.

Native format: a directory with ``config.json`` (``{"kind": "clip", ...ClipConfig}``) and ``model.safetensors``
(EvaClip's own state dict: ``visual.trunk.*``, ``text.*``, ``logit_scale``). The ``kind`` marker tells it from
an evamim EvaViT directory (``local:DIR`` teachers, ``evamim.create_model`` read both). The safetensors
metadata holds the config under ``clip_config``, never under ``config`` (which marks an EvaViT file).

Every load is strict: a tensor missing, left over or of another shape refuses the whole load with one line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from evamim.clip.config import ClipConfig
from evamim.clip.model import EvaClip
from evamim.models.checkpoint import summarise
from evamim.models.sources import CONFIG_NAME, WEIGHTS_NAME

CLIP_KIND = "clip"
logger = logging.getLogger(__name__)


def fit_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> str:
    """What keeps ``state`` from loading strictly where ``expected`` (name -> tensor or shape) is wanted, in one
    phrase; empty when it fits."""
    shape = {key: tuple(value.shape) if hasattr(value, "shape") else tuple(value) for key, value in expected.items()}
    missing = [key for key in shape if key not in state]
    unexpected = [key for key in state if key not in shape]
    mismatched = [key for key in state if key in shape and tuple(state[key].shape) != shape[key]]
    parts = []
    if mismatched:
        key = mismatched[0]
        parts.append(f"{len(mismatched)} of another shape (e.g. {key} {tuple(state[key].shape)} in the file vs "
                     f"{shape[key]} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing ({summarise(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unused ({summarise(unexpected)})")
    return "; ".join(parts)


def model_shapes(config: ClipConfig) -> dict[str, tuple]:
    """name -> shape of every tensor in EvaClip(config)'s state dict, without allocating it (meta device)."""
    with torch.device("meta"):
        model = EvaClip(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# --------------------------------------------------------------------------------------------- native format
def save_clip(model: EvaClip, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created if needed); returns it.

    Refuses (NonFiniteWeightsError, nothing written) a model with NaN or infinite weights, as
    ``evamim.save_pretrained`` does.
    """
    from evamim.models.checkpoint import write_model_directory

    config_json = json.dumps({"kind": CLIP_KIND, **model.config.to_dict()}, indent=2)
    # The metadata key is not "config": evamim's readers would take it for an EvaViT's.
    return write_model_directory(model, directory, config_json, {"kind": CLIP_KIND, "clip_config": config_json})


def _config_values(directory: Path) -> dict | None:
    path = directory / CONFIG_NAME
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    return values if isinstance(values, dict) else None


def is_clip_directory(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory whose config.json says ``"kind": "clip"``."""
    path = Path(path)
    if not path.is_dir():
        return False
    values = _config_values(path)
    return values is not None and values.get("kind") == CLIP_KIND


def read_clip_config(directory: str | os.PathLike) -> ClipConfig:
    """The ClipConfig of a saved EvaClip directory (no open_clip import, no weights read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"EvaClip directory {directory}: it does not exist")
    values = _config_values(directory)
    if values is None:
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: it is not a saved EvaClip (evamim.clip.save_clip)")
    if values.get("kind") != CLIP_KIND:
        raise ValueError(f"{directory / CONFIG_NAME} is not an EvaClip config (no \"kind\": \"clip\"); an evamim "
                         f"EvaViT directory loads with evamim.create_model(pretrained=...)")
    return ClipConfig.from_dict({k: v for k, v in values.items() if k != "kind"})


def load_clip(source: str | os.PathLike | Mapping[str, Any], config: ClipConfig | str | None = None, *,
              device: torch.device | str | None = None) -> EvaClip:
    """An EvaClip with the weights of ``source``, loaded strictly (ValueError naming what does not fit):

    - a saved EvaClip directory (``save_clip``): its own config.json says what to build; ``config`` must be None;
    - an official EVA-CLIP checkpoint (baaivision/EVA ``EVA-CLIP``, ``evamim.clip.official``) or an open_clip EVA
      model (``visual.trunk.*``), as a file or a state dict: ``config`` says what to build -- a ClipConfig, or
      the name of an official model (``EVA02-CLIP-L-14``, see ``OFFICIAL_MODEL_CONFIGS``) or its JSON file.
    """
    if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
        raise FileNotFoundError(f"{source} does not exist: give a saved EvaClip directory or a CLIP checkpoint file")
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        if config is not None:
            raise ValueError(f"{source} is a saved EvaClip directory, whose {CONFIG_NAME} says what to build: "
                             "do not pass a config")
        model = _load_clip_directory(Path(source))
    else:
        if config is None:
            raise ValueError(f"{source if isinstance(source, (str, os.PathLike)) else 'the state dict'} is not a saved "
                             "EvaClip directory: pass config=, a ClipConfig or an official EVA-CLIP model name (e.g. "
                             "EVA02-CLIP-L-14)")
        if not isinstance(config, ClipConfig):
            from evamim.clip.official import official_clip_config

            config = official_clip_config(config)
        model = EvaClip(config)
        for line in load_clip_weights(model, source):
            logger.info("%s", line)
    return model.to(device) if device is not None else model


def _load_clip_directory(directory: Path) -> EvaClip:
    from safetensors.torch import load_file

    config = read_clip_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"EvaClip directory {directory} has no {WEIGHTS_NAME}")
    state = load_file(str(weights))
    model = EvaClip(config)
    problems = fit_problems(state, model.state_dict())
    if problems:
        raise ValueError(f"{weights} does not fit the EvaClip its {CONFIG_NAME} describes: {problems}")
    model.load_state_dict(state, strict=True)
    return model


def load_clip_weights(model: EvaClip, source: str | os.PathLike | Mapping[str, Any]) -> list[str]:
    """Load a whole CLIP into ``model`` -- both towers, both projections, the logit scale -- strictly, from a
    saved EvaClip directory, an official EVA-CLIP checkpoint or an open_clip EVA model (a file or a state dict;
    the layout is told by the keys). ValueError names what does not fit; ``model`` is then unchanged.
    Returns lines saying what was loaded."""
    from evamim.clip.interop import from_open_clip_state_dict
    from evamim.clip.official import is_eva_clip_state, load_eva_clip_weights
    from evamim.models.sources import read_source

    if isinstance(source, (str, os.PathLike)) and is_clip_directory(source):
        saved = _load_clip_directory(Path(source))
        problems = fit_problems(saved.state_dict(), model.state_dict())
        if problems:
            raise ValueError(f"the EvaClip in {source} does not fit this model: {problems}")
        model.load_state_dict(saved.state_dict(), strict=True)
        return [f"every tensor from the EvaClip directory {source}"]
    state = read_source(source).state
    if is_eva_clip_state(state):
        return load_eva_clip_weights(model, state)
    if any(key.split("visual.trunk.", 1)[0] in ("", "module.") and "visual.trunk." in key for key in state):
        model.load_state_dict(from_open_clip_state_dict(state, model.config), strict=True)
        return ["every tensor from an open_clip EVA model (visual.trunk.*, text.*, logit_scale)"]
    keys = sorted(state)
    raise ValueError(f"not a CLIP checkpoint evamim reads whole (an EvaClip directory, an official EVA-CLIP file with "
                     f"visual.pos_embed, an open_clip EVA model with visual.trunk.*): its keys begin "
                     f"{', '.join(keys[:4])}; a vision tower alone initialises with load_vision")


# ------------------------------------------------------------------------------------- vision initialisation
def _holds_clip_tower(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a CLIP model's (open_clip ``visual.trunk.``, EVA-CLIP ``visual.``): its vision
    head is then the CLIP projection, not a classifier."""
    from evamim.models.layouts import WRAPPER_PREFIXES

    for key in state:
        for prefix in WRAPPER_PREFIXES:
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key.startswith("visual."):
            return True
    return False


def _read_vision_source(source, prefer_ema: bool):
    """SourceWeights of ``source``; for an EvaClip directory the config it states is its vision tower's."""
    from evamim.models.sources import SourceWeights, read_source

    if isinstance(source, (str, os.PathLike)) and is_clip_directory(source):
        from safetensors.torch import load_file

        config = read_clip_config(source)
        state = load_file(str(Path(source) / WEIGHTS_NAME))
        return SourceWeights(state, config=config.vision.to_dict(), config_origin=f"{source}/{CONFIG_NAME} (vision)",
                             kind="evamim EvaClip")
    return read_source(source, prefer_ema=prefer_ema)


def load_vision(model: EvaClip, source, *, projection: bool | None = None, prefer_ema: bool = False):
    """Initialise ``model.visual`` from any checkpoint ``evamim.load_weights`` reads (official EVA ``.pt``,
    timm, open_clip / EVA-CLIP, an evamim or EvaClip directory, a training checkpoint); returns its LoadReport.

    Strict: every trunk tensor is loaded (position embeddings and patch kernels resampled as
    ``load_weights`` does) or WeightsMismatchError is raised and the model is untouched.
    ``projection``: take the CLIP projection (``visual.trunk.head``) from the file too, which then must hold one
    of the right shape. None (default) = when the file is a CLIP model's (keys under ``visual.``); a MIM or
    classifier checkpoint's head is not a CLIP projection, so the projection keeps its initialisation and the
    file's head is reported as dropped.
    """
    from evamim.models.checkpoint import TASK_HEADS, load_weights

    weights = _read_vision_source(source, prefer_ema)
    if projection is None:
        projection = _holds_clip_tower(weights.state)
    trunk = model.visual.trunk
    if projection:
        # The head is not a task head here: a strict load must fill it.
        return load_weights(trunk, weights, task_heads=tuple(h for h in TASK_HEADS if h != "head."))
    head, trunk.head = trunk.head, nn.Identity()
    try:
        report = load_weights(trunk, weights, task_heads=TASK_HEADS)
    finally:
        trunk.head = head
    report.notes.append("the CLIP projection (visual.trunk.head) keeps its initialisation")
    return report


__all__ = [
    "CLIP_KIND",
    "fit_problems",
    "is_clip_directory",
    "load_clip",
    "load_clip_weights",
    "load_vision",
    "model_shapes",
    "read_clip_config",
    "save_clip",
]
