"""Reading checkpoints: any supported file (or in-memory dict) -> its tensors, container and stated config.

Covers evamim directories and ``.safetensors`` files, pickled ``.pt`` / ``.pth`` / ``.bin`` files (read with
``torch.load(weights_only=True)``; a pickle that needs arbitrary code is refused, never executed, and broken
bytes are reported as corrupt), the containers of training checkpoints (model / EMA weights) and the config an
evamim training checkpoint states. Only reads: mapping names (``layouts``) and loading (``checkpoint``) are
elsewhere.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TRAIN_CHECKPOINT_FORMAT = "evamim-train-checkpoint"  # evamim.engine.checkpoint.FORMAT
# Containers of training checkpoints. The model's own weights come first, as in the official EVA code;
# EMA weights are taken only when asked for (timm's filter prefers them; evamim says which it took).
MODEL_CONTAINERS = ("model", "module", "state_dict")
EMA_CONTAINERS = ("model_ema", "state_dict_ema")


class UnsafeCheckpointError(RuntimeError):
    """A pickled checkpoint needs arbitrary code to load; evamim refuses to run it."""


class CorruptCheckpointError(ValueError):
    """The file is not a checkpoint at all, or it is truncated / corrupt."""


def safetensors_config(path: Path) -> dict | None:
    """The EvaViTConfig values evamim stores in a .safetensors file's metadata, or None (timm, open_clip, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["config"]) if "config" in metadata else None


@dataclass
class SourceWeights:
    """A checkpoint as read: its tensors, which container they came from, and the config the file states.

    ``config`` holds EvaViTConfig values: all of them for evamim models, the preset and options of the run for
    evamim training checkpoints, None when the file says nothing about its architecture (official, timm,
    open_clip files).
    """

    state: dict[str, Any]
    container_key: str | None = None
    other_containers: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    config_origin: str | None = None
    kind: str | None = None
    """'evamim' (directory / .safetensors with its config), 'evamim training checkpoint', or None (the key
    layout says what the file is)."""

    @property
    def source_grid(self) -> tuple[int, int] | None:
        """The patch grid the file's pos_embed / RoPE tables were made for, when its config says so."""
        if not self.config or "img_size" not in self.config or "patch_size" not in self.config:
            return None
        return grid_of(self.config["img_size"], self.config["patch_size"])


def grid_of(img_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return (int(height) // patch_size, int(width) // patch_size)


def read_source(
    source: str | os.PathLike | Mapping[str, Any] | SourceWeights, *, prefer_ema: bool = False
) -> SourceWeights:
    """Read any supported checkpoint: tensors, container and stated config (see the module docstring)."""
    if isinstance(source, SourceWeights):
        return source
    if isinstance(source, Mapping):
        return _from_checkpoint(dict(source), prefer_ema)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            contents = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (it holds: {contents})")
        if (path / CONFIG_NAME).exists():
            config = json.loads((path / CONFIG_NAME).read_text())
            if config.get("kind") == "clip":  # a saved EvaClip (evamim.clip): its vision trunk's config
                config = config["vision"]
            return SourceWeights(_load_safetensors(weights), config=config, config_origin=str(path / CONFIG_NAME),
                                 kind="evamim")
        path = weights
    if path.suffix == ".safetensors":
        # Only evamim writes its config into the metadata; timm / open_clip .safetensors are told by their keys.
        config = safetensors_config(path)
        return SourceWeights(_load_safetensors(path), config=config, kind="evamim" if config else None,
                             config_origin=f"the metadata of {path.name}" if config else None)
    return _from_checkpoint(_load_pickle_safely(path), prefer_ema)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _from_checkpoint(checkpoint: dict[str, Any], prefer_ema: bool) -> SourceWeights:
    state, key, others = _find_container(checkpoint, prefer_ema)
    source = SourceWeights(state, container_key=key, other_containers=others)
    if checkpoint.get("format") == TRAIN_CHECKPOINT_FORMAT and isinstance(checkpoint.get("config"), Mapping):
        source.config, source.config_origin = _train_checkpoint_config(checkpoint["config"])
        source.kind = "evamim training checkpoint"
    return source


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The raw checkpoint object of a path (evamim dir, .safetensors, pickled .pt/.pth/.bin), or a dict as is."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir() or path.suffix == ".safetensors":
        return read_source(path).state
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _load_pickle_safely(path)


def _load_pickle_safely(path: Path) -> dict[str, Any]:
    # Official EVA training checkpoints may carry the run's argparse.Namespace; it holds plain values and
    # cannot execute code, so it is the one class allowed beyond what weights_only accepts.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unsafe_pickle_reason(str(error), path)
        if reason is None:
            raise CorruptCheckpointError(
                f"{path} is not a PyTorch checkpoint or is truncated/corrupt: its pickle stream is broken"
            ) from None
        # torch's message suggests weights_only=False; evamim never does that, so only the culprit is kept.
        raise UnsafeCheckpointError(
            f"refused to load {path}: unpickling it would run code ({reason}), which evamim never does. If the "
            f"file comes from a source you trust, extract its tensors yourself and save them with safetensors, "
            f"then load that file."
        ) from None
    except (OSError, MemoryError):
        raise
    except Exception as error:  # broken bytes fail in many ways: EOFError, KeyError, IndexError, struct.error, ...
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise CorruptCheckpointError(f"{path} is not a PyTorch checkpoint or is truncated/corrupt ({detail})") from None
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights")
    return checkpoint


def _unsafe_pickle_reason(message: str, path: Path) -> str | None:
    """Why torch's safe unpickler refused a well-formed pickle (the class it would import), or None when the
    bytes are not a pickle at all (garbage, a corrupt file): those are corrupt, not unsafe."""
    culprit = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", message)
    if culprit:
        return f"it imports {culprit.group(1)}"
    referenced = _pickle_globals(path)
    if referenced is None:
        return None
    names = ", ".join(referenced[:4]) or "no class"
    return f"its pickle uses instructions torch's safe loader refuses; it references {names}"


def _pickle_globals(path: Path) -> list[str] | None:
    """The module.name globals the (first) pickle in ``path`` references, or None if it is not a valid pickle.

    Only parses opcodes (pickletools), never executes them. torch.save files are zip archives holding
    ``*/data.pkl``; plain pickle.dump files are the pickle itself.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                return _globals_in(archive.read(member))
        with open(path, "rb") as f:
            return _globals_in(f)
    except Exception:  # any parse failure (bad opcode, short stream, bad zip CRC) means: not a pickle
        return None


def _globals_in(stream) -> list[str]:
    if isinstance(stream, bytes):
        stream = io.BytesIO(stream)
    found, strings = [], []
    for opcode, argument, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            found.append(str(argument).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(argument, str):
            strings.append(argument)
    return list(dict.fromkeys(found))


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _find_container(checkpoint: Mapping[str, Any], prefer_ema: bool) -> tuple[dict[str, Any], str | None, list[str]]:
    """(state dict, container key or None for a plain state dict, the other containers holding weights)."""
    order = EMA_CONTAINERS + MODEL_CONTAINERS if prefer_ema else MODEL_CONTAINERS + EMA_CONTAINERS
    present = [key for key in order if _holds_tensors(checkpoint.get(key))]
    if prefer_ema and not any(key in EMA_CONTAINERS for key in present):
        held = ", ".join(f"'{k}'" for k in present) or "a plain state dict"
        raise ValueError(f"asked for the EMA weights but the checkpoint has none ({' / '.join(EMA_CONTAINERS)}); "
                         f"it holds {held}: load without prefer_ema / --ema")
    if present:
        return dict(checkpoint[present[0]]), present[0], present[1:]
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"no weights found: the checkpoint has keys {sorted(checkpoint)[:10]} and none of "
            f"{list(MODEL_CONTAINERS + EMA_CONTAINERS)} holds tensors"
        )
    return tensors, None, []


def unwrap_container(checkpoint: Mapping[str, Any], prefer_ema: bool = False) -> tuple[dict[str, Any], str | None]:
    """Find the tensor dict inside a training checkpoint. Returns (state_dict, the container key used or None)."""
    state, key, _ = _find_container(checkpoint, prefer_ema)
    return state, key


def _train_checkpoint_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """EvaViTConfig values of an evamim training run: its preset + options (``model`` section for pretraining,
    ``backbone`` for downstream tasks) at the data's image size."""
    from evamim.models.presets import PRESETS

    for section_name in ("model", "backbone"):
        section = run_config.get(section_name)
        if isinstance(section, Mapping) and section.get("name") in PRESETS:
            values = {**PRESETS[section["name"]], **(section.get("options") or {})}
            image_size = (run_config.get("data") or {}).get("image_size")
            if image_size and "img_size" not in (section.get("options") or {}):
                values["img_size"] = image_size
            return values, f"the training checkpoint's config (preset {section['name']!r})"
    return None, None
