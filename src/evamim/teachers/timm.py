"""``timm:MODEL[.TAG][/WEIGHTS_FILE]`` teachers: any timm ViT-family model (VisionTransformer, Eva, ...).

Targets: the patch tokens of ``forward_features`` (after the final ``norm``), prefix tokens (cls,
registers: ``model.num_prefix_tokens``) dropped, then ``fc_norm`` (an identity except in models that
normalise after pooling, where it is the final norm). With ``project=True`` the model's linear ``head``
is applied to every token: timm's CLIP models (``vit_large_patch14_clip_quickgelu_224.openai``, ...) keep the CLIP
projection there, so that gives the same targets as ``open_clip:``. It is off by default because in an
ImageNet classifier the head is the classifier.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import torch
from torch import nn

from evamim.teachers.base import IMAGENET_MEAN, IMAGENET_STD, TokenEncoder, keep_blocks
from evamim.teachers.errors import GridMismatchError, grid_text, hub_cache_dir, weights_not_found
from evamim.teachers.hub import cached_hub_file, safetensors_first, why_no_download

logger = logging.getLogger(__name__)


def _square(size: Any, what: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"{what} must be square, got {tuple(size)}")
        size = size[0]
    return int(size)


def out_features(module: nn.Module, in_features: int) -> int:
    """Output width of a per-token head made of Linear / Mlp / Dropout / Identity / norm layers."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Identity, nn.Dropout, nn.LayerNorm)):
        return in_features
    if isinstance(module, nn.Sequential):
        for child in module:
            in_features = out_features(child, in_features)
        return in_features
    last_linear = getattr(module, "fc2", None)  # timm Mlp
    if isinstance(last_linear, nn.Linear):
        return last_linear.out_features
    raise ValueError(f"cannot apply {type(module).__name__} to each patch token: it is not a per-token projection")


class TimmTokens(TokenEncoder):
    """Patch tokens of a timm ViT-family model, optionally through its head (and an extra per-token head).

    images (B, 3, h*p, w*p), teacher-normalised -> (B, h*w, D).
    """

    def __init__(self, model: nn.Module, *, project: bool, layer: int | None = None, extra_head: nn.Module | None = None, name: str = "timm model"):
        super().__init__()
        for attribute in ("patch_embed", "num_prefix_tokens", "forward_features", "blocks"):
            if not hasattr(model, attribute):
                raise ValueError(
                    f"{name} ({type(model).__name__}) is not a ViT-family timm model (no `{attribute}`); "
                    f"a teacher needs patch tokens"
                )
        self.name = name
        self.model = model
        self.patch_size = _square(model.patch_embed.patch_size, f"{name} patch size")
        self.native_grid = tuple(int(v) for v in model.patch_embed.grid_size)
        if layer is not None:
            model.blocks = keep_blocks(model.blocks, layer, name)
        self.project = project
        self.extra_head = extra_head if project else None
        width = int(model.num_features)
        if project:
            if getattr(model, "attn_pool", None) is not None:
                raise ValueError(
                    f"{name} pools with attention before its head, so the head has no per-token meaning; "
                    f"use project=False for unprojected patch tokens"
                )
            if not isinstance(model.head, nn.Linear):
                raise ValueError(f"{name} has no linear head to project tokens with; use project=False")
            width = model.head.out_features
            if extra_head is not None:
                width = out_features(extra_head, width)
        self.embed_dim = width

    def set_grid(self, grid: tuple[int, int]) -> None:
        if getattr(self.model, "dynamic_img_size", False):
            return
        if not hasattr(self.model, "set_input_size"):
            raise GridMismatchError(
                f"{self.name} ({type(self.model).__name__}) runs only at its native grid "
                f"{grid_text(self.native_grid)} and cannot be resized to the student's grid {grid_text(grid)}: "
                f"build the student with a {grid_text(self.native_grid)} grid, or pick a teacher with "
                f"set_input_size / dynamic_img_size support"
            )
        self.model.set_input_size(img_size=(grid[0] * self.patch_size, grid[1] * self.patch_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
        tokens = model.fc_norm(tokens) if hasattr(model, "fc_norm") else tokens
        if self.project:
            tokens = model.head(tokens)
            if self.extra_head is not None:
                tokens = self.extra_head(tokens)
        return tokens


def _split_name(target: str, spec: str) -> tuple[str, str | None]:
    """'NAME' -> (NAME, None); 'NAME/FILE' -> (NAME, FILE)."""
    if target.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"{spec!r}: timm hub / directory names are not supported; use 'timm:MODEL.TAG' (weights from the "
            f"hub or its cache) or 'timm:MODEL/path/to/weights' (a local file)"
        )
    name, sep, weights = target.partition("/")
    return name, (weights if sep else None)


def _pretrained_cfg(name: str, spec: str):
    """The registered pretrained config of ``name`` (MODEL or MODEL.TAG), which must name downloadable weights."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=True)
    except RuntimeError as error:  # an unknown tag
        raise ValueError(f"{spec!r}: {error} See timm.list_pretrained('{name.split('.')[0]}*') for valid tags.") from error
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(
            f"{spec!r}: timm has no pretrained weights registered for {name!r}; give a weights file: "
            f"'timm:{name}/path/to/weights.safetensors'"
        )
    return cfg


def _weights_file(name: str, spec: str, cache_dir: str | None) -> str:
    """Local path of the registered pretrained weights of ``name`` (MODEL or MODEL.TAG): from the cache
    when present (no network), else downloaded. Raises TeacherWeightsNotFoundError when neither works."""
    cfg = _pretrained_cfg(name, spec)
    looked, cached = [], None
    if cfg.hf_hub_id:  # timm prefers the hub over the URL when both exist
        filenames = safetensors_first(cfg.hf_hub_filename) if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        looked.append(f"hub repo {cfg.hf_hub_id}, files {filenames}, in {cache_dir or hub_cache_dir()}")
        cached = cached_hub_file(cfg.hf_hub_id, filenames, cache_dir)
    else:
        directory = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
        url_file = os.path.join(directory, os.path.basename(cfg.url.split("?")[0]))
        looked.append(f"file {url_file} (download cache of {cfg.url})")
        cached = url_file if os.path.isfile(url_file) else None
    if cached is not None:
        return cached
    reason = why_no_download() if cfg.hf_hub_id else None
    if reason is not None:
        raise weights_not_found(spec, looked + [f"({reason})"])
    try:
        if cfg.hf_hub_id:
            from huggingface_hub import hf_hub_download

            error = None
            for filename in filenames:
                try:
                    return hf_hub_download(cfg.hf_hub_id, filename, cache_dir=cache_dir)
                except Exception as exc:  # the next candidate may exist; the last failure is reported
                    error = exc
            raise error
        os.makedirs(os.path.dirname(url_file), exist_ok=True)
        torch.hub.download_url_to_file(cfg.url, url_file)
        return url_file
    except Exception as error:
        raise weights_not_found(spec, looked, error) from error


def _check_quick_gelu(name: str, spec: str) -> None:
    """timm registers OpenAI's CLIP weights under both the GELU and the QuickGELU architectures; only the
    latter computes what the weights were trained for."""
    import timm

    arch, _, tag = name.partition(".")
    if tag != "openai" or "quickgelu" in arch:
        return
    fixed = arch.replace("_clip_", "_clip_quickgelu_", 1) + ".openai"
    if fixed in timm.list_pretrained(fixed):
        raise ValueError(
            f"{spec!r}: OpenAI's CLIP weights were trained with QuickGELU activations but {arch!r} uses GELU, so "
            f"every target would be wrong; use 'timm:{fixed}'"
        )


def _check_name(name: str, spec: str) -> None:
    import timm

    if not timm.is_model(name):
        arch = name.partition(".")[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"close matches: {close}" if close else "see timm.list_models('*clip*') for candidates"
        raise ValueError(f"{spec!r}: unknown timm model {name!r}; {hint}")


def _meta_model(name: str, spec: str, model_kwargs: dict | None) -> nn.Module | None:
    """``name`` instantiated on the meta device (no memory, no weights), or None when its init needs real
    tensors (``build`` checks the real model either way). Unknown ``model_kwargs`` are refused here."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **dict(model_kwargs or {}))
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise ValueError(f"{spec!r}: model_kwargs: {error}") from None
        logger.debug("timm model %r cannot be built on the meta device (%s); checked when built", name, error)
    except Exception as error:  # an architecture whose init needs real tensors: leave it to build()
        logger.debug("timm model %r cannot be built on the meta device (%s); checked when built", name, error)
    return None


def check(
    target: str,
    *,
    spec: str,
    layer: int | None = None,
    project: bool = False,
    cache_dir: str | None = None,
    model_kwargs: dict | None = None,
) -> int | None:
    """What ``build`` would refuse, found without weights or a download: an unknown model or tag, a missing
    weights file, a model that is not a ViT (e.g. ``resnet50``), no linear head with ``project``, a
    ``layer`` out of range. The model is instantiated on the meta device for the structural checks.
    Returns the target width D when known."""
    name, weights_file = _split_name(target, spec)
    _check_name(name, spec)
    _check_quick_gelu(name, spec)
    if weights_file is not None:
        if not os.path.isfile(weights_file):
            raise weights_not_found(spec, [f"file {weights_file} (named in the spec): it does not exist"])
    else:
        _pretrained_cfg(name, spec)
    model = _meta_model(name, spec, model_kwargs)
    if model is None:
        return None
    return TimmTokens(model, project=project, layer=layer, name=f"timm model {name!r}").embed_dim


def build(
    target: str,
    *,
    spec: str,
    layer: int | None = None,
    project: bool = False,
    cache_dir: str | None = None,
    model_kwargs: dict | None = None,
) -> tuple[TokenEncoder, tuple, tuple]:
    """Build the encoder for ``timm:MODEL[.TAG][/WEIGHTS_FILE]``; returns (encoder, mean, std).

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size``); ``cache_dir`` overrides the hub cache.
    The teacher's mean/std come from the model's pretrained config (ImageNet's when it has none).
    """
    import timm

    name, weights_file = _split_name(target, spec)
    _check_name(name, spec)
    _check_quick_gelu(name, spec)
    if weights_file is not None:
        if not os.path.isfile(weights_file):
            raise weights_not_found(spec, [f"file {weights_file} (named in the spec): it does not exist"])
    else:
        weights_file = _weights_file(name, spec, cache_dir)
    model_kwargs = dict(model_kwargs or {})
    # .npz files are Google's big_vision format, which only the model's own loader reads.
    overlay = dict(file=weights_file, custom_load=weights_file.endswith(".npz"))
    if "num_classes" in model_kwargs:
        # timm silently drops head weights whose class count differs from the pretrained config's; the file
        # is the config here, so the head is loaded (strictly) instead of left random.
        overlay["num_classes"] = model_kwargs["num_classes"]
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    cfg = model.pretrained_cfg or {}
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    encoder = TimmTokens(model, project=project, layer=layer, name=f"timm model {name!r}")
    return encoder, mean, std
