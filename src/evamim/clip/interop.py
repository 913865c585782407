"""EvaClip <-> open_clip: model configs, state dicts, open_clip model directories, text towers.

open_clip builds an EVA tower as ``timm.create_model(timm_model_name, num_classes=embed_dim, global_pool=pool)``
and takes no other trunk arguments, so an architecture is named, not described: ``register_timm_trunk(config)``
registers a timm entrypoint (``evamim_eva_...``, a name derived from the trunk's timm kwargs) that builds
``timm.models.eva.Eva(**timm_model_kwargs(config.vision))``, and ``open_clip_config(config)`` names it. Register
before open_clip builds the model (``create_open_clip_model`` does both). Where the architecture is one of
open_clip's own (e.g. ``EVA02-B-16``: the eva02_base_p14 preset at patch 16 with ``sub_ln_attn``), the exported
state dict loads into open_clip's config too: the layouts are the same.

State dicts: open_clip's ``CustomTextCLIP`` layout -- the timm trunk under ``visual.trunk.`` (timm's names:
``q_proj``/``k_proj``/``v_proj`` and ``fc1_g``/``fc1_x`` for EVA-02 trunks with sub-LN), ``text.*``,
``logit_scale``. ``from_open_clip_state_dict`` also takes the text of a plain ``CLIP`` (OpenAI layout:
``token_embedding``, ``transformer``, ... at the top level) and the ``module.`` prefix of training checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim import atomic
from evamim.clip.checkpoint import fit_problems, model_shapes
from evamim.clip.config import ClipConfig
from evamim.clip.model import EvaClip
from evamim.constants import CLIP_MEAN, CLIP_STD
from evamim.models.export import OPEN_CLIP_TRUNK_PREFIX, timm_model_kwargs
from evamim.models.export import to_open_clip_state_dict as vision_to_open_clip
from evamim.models.layouts import WRAPPER_PREFIXES, normalise_layout

# Text-tower tensors of open_clip's plain CLIP (OpenAI layout), which CustomTextCLIP holds under ``text.``.
CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
                  "cls_emb")
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"


# -------------------------------------------------------------------------------------------- model configs
def _trunk_kwargs(config: ClipConfig) -> dict[str, Any]:
    """timm Eva kwargs of the trunk, less the two open_clip passes itself (num_classes, global_pool)."""
    kwargs = timm_model_kwargs(config.vision)
    for key in ("num_classes", "global_pool"):
        kwargs.pop(key)
    return kwargs


def timm_trunk_name(config: ClipConfig) -> str:
    """The timm model name of the trunk: ``evamim_eva_w{width}_d{depth}_p{patch}_{digest of the kwargs}``."""
    kwargs = _trunk_kwargs(config)
    digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
    vision = config.vision
    return f"evamim_eva_w{vision.embed_dim}_d{vision.depth}_p{vision.patch_size}_{digest}"


def register_timm_trunk(config: ClipConfig) -> str:
    """Register the trunk's architecture with timm (idempotent); returns its name (``timm_trunk_name``)."""
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    name = timm_trunk_name(config)
    if timm.is_model(name):
        return name
    kwargs = _trunk_kwargs(config)

    def entrypoint(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                   **overrides):
        if pretrained:
            raise ValueError(f"timm has no weights for {name}: load evamim's export instead "
                             f"(evamim.clip.to_open_clip_state_dict)")
        return Eva(**{**kwargs, **overrides})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    # timm lists a registered name in its module's __all__: make the name a real attribute of this module.
    setattr(sys.modules[__name__], name, entrypoint)
    register_model(entrypoint)
    return name


def open_clip_config(config: ClipConfig) -> dict[str, Any]:
    """The open_clip model config (the JSON of ``open_clip/model_configs/*.json``) for the same architecture.

    ``vision_cfg.timm_model_name`` is ``timm_trunk_name(config)``: call ``register_timm_trunk(config)`` in the
    process before open_clip builds it. ``custom_text: true`` selects ``CustomTextCLIP`` in
    ``open_clip.create_model``; pass the rest to ``open_clip.CustomTextCLIP(**...)`` to build it directly.
    """
    size = config.vision.img_size
    vision_cfg = {
        "image_size": size[0] if size[0] == size[1] else list(size),
        "timm_model_name": timm_trunk_name(config),
        "timm_model_pretrained": False,
        "timm_pool": config.pool,
        "timm_proj": None,
    }
    if config.vision.drop_path_rate:
        vision_cfg["timm_drop_path"] = config.vision.drop_path_rate
    return {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.quick_gelu,
        "init_logit_scale": config.init_logit_scale,
        "vision_cfg": vision_cfg,
        "text_cfg": dict(config.text),
        "custom_text": True,
    }


def create_open_clip_model(config: ClipConfig):
    """open_clip's ``CustomTextCLIP`` for ``config`` (random init), its trunk registered with timm first."""
    import open_clip

    register_timm_trunk(config)
    values = open_clip_config(config)
    values.pop("custom_text")
    return open_clip.CustomTextCLIP(**values)


# --------------------------------------------------------------------------------------------- state dicts
def to_open_clip_state_dict(model: EvaClip, *, qkv_fused: bool | None = None) -> dict[str, torch.Tensor]:
    """``model``'s weights in open_clip's CustomTextCLIP layout; loads strictly into
    ``create_open_clip_model(model.config)`` (and into open_clip's own config of the same architecture).
    ``qkv_fused``: as in ``evamim.models.export.timm_model_kwargs`` (None = timm's layout for the trunk)."""
    state = vision_to_open_clip(model.visual.trunk, qkv_fused=qkv_fused)
    state.update({f"text.{k}": v.detach().clone() for k, v in model.text.state_dict().items()})
    state["logit_scale"] = model.logit_scale.detach().clone()
    return state


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _text_key(key: str) -> str | None:
    """The EvaClip name of an open_clip text-tower tensor (CustomTextCLIP ``text.*`` or plain CLIP), else None."""
    if key.startswith("text."):
        return key
    if key.startswith(CLIP_TEXT_KEYS):
        return f"text.{key}"
    return None


def from_open_clip_state_dict(state: Mapping[str, Any], config: ClipConfig) -> dict[str, torch.Tensor]:
    """An open_clip EVA model's state dict (``visual.trunk.*`` + text + ``logit_scale``) -> EvaClip's layout
    for ``config``, checked strictly: ValueError in one line when a tensor is missing, left over or of another
    shape (another architecture, ``logit_bias`` of SigLIP models, ``visual.head`` projections)."""
    state = _strip_wrappers(state)
    state.pop("attn_mask", None)  # a constant causal mask that old OpenAI-layout files stored as a buffer
    vision = {k: v for k, v in state.items() if k.startswith(OPEN_CLIP_TRUNK_PREFIX)}
    if not vision:
        raise ValueError(f"no open_clip EVA vision tower ({OPEN_CLIP_TRUNK_PREFIX}*) in the state dict; other "
                         f"CLIP checkpoints initialise the vision tower with evamim.clip.load_vision")
    trunk, _, rope_tables = normalise_layout(vision)
    if rope_tables:
        raise ValueError("the open_clip state dict holds RoPE tables, which timm trunks never store: it is not an "
                         "open_clip EVA model; initialise the vision tower with evamim.clip.load_vision")
    converted = {OPEN_CLIP_TRUNK_PREFIX + k: v for k, v in trunk.items()}
    for key, value in state.items():
        if key.startswith(OPEN_CLIP_TRUNK_PREFIX):
            continue
        converted[_text_key(key) or key] = value
    problems = fit_problems(converted, model_shapes(config))
    if problems:
        raise ValueError(f"the open_clip state dict does not fit this EvaClip config: {problems}")
    return converted


def _read_state(source) -> dict[str, Any]:
    from evamim.models.sources import read_source

    return _strip_wrappers(read_source(source).state)


def load_open_clip(source, config: ClipConfig) -> EvaClip:
    """An EvaClip for ``config`` with the weights of an open_clip EVA model (a state dict or a file:
    ``.safetensors``, ``.bin``/``.pt``, an open_clip training checkpoint), loaded strictly."""
    model = EvaClip(config)
    model.load_state_dict(from_open_clip_state_dict(_read_state(source), config), strict=True)
    return model


def load_open_clip_text(model: EvaClip, source, *, projection: bool = True, logit_scale: bool = True) -> str:
    """Initialise ``model.text`` (and ``logit_scale``) from any open_clip model's weights (CustomTextCLIP or
    plain CLIP layout, e.g. OpenAI's CLIP-L text tower for EVA-CLIP-g; official EVA-CLIP files have the same
    text names); the vision tensors are ignored.

    Strict over the text tower: every tensor loaded or ValueError naming what does not fit, nothing changed.
    ``projection=False`` keeps ``text.text_projection`` at its initialisation (another joint width);
    ``logit_scale=False`` keeps the model's. Returns a one-line summary of what was loaded.
    """
    state = _read_state(source)
    state.pop("attn_mask", None)
    if "text.logit_scale" in state and "logit_scale" not in state:
        # EVA-01's EVA_CLIP (eva_clip_psz14.pt) keeps the logit scale in its text tower.
        state["logit_scale"] = state.pop("text.logit_scale")
    text = {name: value for key, value in state.items() if (name := _text_key(key)) is not None}
    if not text:
        raise ValueError("no open_clip text tower (text.* or token_embedding / transformer / ln_final) in the file")
    expected = {f"text.{k}": v for k, v in model.text.state_dict().items()}
    if not projection:
        for table in (text, expected):
            for key in [k for k in table if k.startswith("text.text_projection")]:
                del table[key]
    if logit_scale:
        if "logit_scale" not in state:
            raise ValueError("the file has no logit_scale; pass logit_scale=False to keep the model's")
        text["logit_scale"] = state["logit_scale"]
        expected["logit_scale"] = model.logit_scale
    problems = fit_problems(text, expected)
    if problems:
        raise ValueError(f"the open_clip text tower does not fit this EvaClip: {problems}")
    model.load_state_dict(text, strict=False)
    loaded = ["projection" if projection else "no projection"] + (["logit_scale"] if logit_scale else [])
    return f"loaded {len(text)} open_clip text tensors ({', '.join(loaded)})"


# ------------------------------------------------------------------------------------ open_clip directories
def save_open_clip(model: EvaClip, directory: str | os.PathLike) -> Path:
    """Write an open_clip model directory: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
    ``open_clip_model.safetensors``. ``open_clip.create_model('local-dir:DIR')`` builds and loads it (strictly)
    once ``register_timm_trunk(model.config)`` has run in that process."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in to_open_clip_state_dict(model).items()}
    size = model.config.vision.img_size
    preprocess = {"size": size[0] if size[0] == size[1] else list(size), "mean": list(CLIP_MEAN),
                  "std": list(CLIP_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    atomic.write_with(directory / OPEN_CLIP_WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    atomic.write_json(directory / OPEN_CLIP_CONFIG_NAME,
                      {"model_cfg": open_clip_config(model.config), "preprocess_cfg": preprocess})
    return directory


__all__ = [
    "create_open_clip_model",
    "from_open_clip_state_dict",
    "load_open_clip",
    "load_open_clip_text",
    "open_clip_config",
    "register_timm_trunk",
    "save_open_clip",
    "timm_trunk_name",
    "to_open_clip_state_dict",
]
