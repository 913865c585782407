"""``hf:MODEL_ID_OR_DIR`` teachers: a Hugging Face transformers CLIP vision tower.

Loaded as ``CLIPVisionModelWithProjection`` (a ``CLIPModel`` checkpoint such as ``openai/clip-vit-large-patch14``
works too: its text tower is ignored). Targets: ``visual_projection(post_layernorm(last_hidden_state[:, 1:]))``
-- ``last_hidden_state`` is NOT normalised in transformers, so ``post_layernorm`` is applied here --
(B, N, projection_dim); ``project=False`` drops ``visual_projection``: (B, N, hidden_size). ``layer=k`` takes
encoder layer k's tokens (``post_layernorm`` and the projection still applied).

The teacher's mean/std come from the checkpoint's ``preprocessor_config.json`` when it is available locally,
else OpenAI CLIP's (what every CLIP checkpoint on the hub uses).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from evamim.teachers.base import CLIP_MEAN, CLIP_STD, TokenEncoder, keep_blocks
from evamim.teachers.errors import hub_cache_dir, weights_not_found
from evamim.teachers.hub import cached_hub_file, why_no_download


class HFTokens(TokenEncoder):
    """Patch targets of a transformers ``CLIPVisionModelWithProjection``: (B, 3, h*p, w*p) -> (B, h*w, D)."""

    def __init__(self, model: nn.Module, *, project: bool, layer: int | None, name: str):
        super().__init__()
        config = model.config
        self.name = name
        self.model = model
        self.patch_size = int(config.patch_size)
        side = int(config.image_size) // self.patch_size
        self.native_grid = (side, side)
        self.project = project
        encoder = model.vision_model.encoder
        if layer is not None:
            encoder.layers = keep_blocks(encoder.layers, layer, name)
        self.embed_dim = model.visual_projection.out_features if project else int(config.hidden_size)
        # transformers resamples the position embeddings (bicubic) on every call when asked to.
        self.interpolate_pos_encoding = False

    def set_grid(self, grid: tuple[int, int]) -> None:
        self.interpolate_pos_encoding = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        hidden = vision(pixel_values=images, interpolate_pos_encoding=self.interpolate_pos_encoding).last_hidden_state
        tokens = vision.post_layernorm(hidden[:, 1:])
        return self.model.visual_projection(tokens) if self.project else tokens


def _normalisation(source: str, cache_dir: str | None) -> tuple[tuple, tuple]:
    if os.path.isdir(source):
        path = os.path.join(source, "preprocessor_config.json")
        path = path if os.path.isfile(path) else None
    else:
        path = cached_hub_file(source, ["preprocessor_config.json"], cache_dir)
    if path is None:
        return CLIP_MEAN, CLIP_STD
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return tuple(config.get("image_mean") or CLIP_MEAN), tuple(config.get("image_std") or CLIP_STD)


def _check_source(source: str, spec: str) -> None:
    """A path (not a hub id) named in the spec must be an existing directory."""
    if not os.path.isdir(source) and (source.startswith(("/", "./", "../", "~")) or source.count("/") > 1):
        raise weights_not_found(spec, [f"directory {source} (named in the spec): it does not exist"])


def check(target: str, *, spec: str, layer: int | None = None, project: bool = True, cache_dir: str | None = None,
          revision: str | None = None) -> None:
    """What can be refused before loading: a directory named in the spec that does not exist. (The target
    width is known once the config is read: None here.)"""
    _check_source(os.path.expanduser(target), spec)


def _load(source: str, spec: str, cache_dir: str | None, revision: str | None):
    from transformers import CLIPVisionModelWithProjection

    # fp32 weights as the reference teacher uses; transformers 5 would otherwise keep the checkpoint's dtype.
    kwargs = dict(dtype=torch.float32, cache_dir=cache_dir, revision=revision, output_loading_info=True)
    is_dir = os.path.isdir(source)
    _check_source(source, spec)
    looked = [f"directory {source}" if is_dir else f"hub repo {source} in {cache_dir or hub_cache_dir()}"]
    try:
        # The cache first: the hub client would spend ~25 s per file in retries when the network is down.
        return CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as error:
        if is_dir:
            raise weights_not_found(spec, looked, error) from error
        reason = why_no_download()
        if reason is not None:
            raise weights_not_found(spec, looked + [f"({reason})"], error) from error
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, **kwargs)
    except OSError as error:
        raise weights_not_found(spec, looked, error) from error


def build(
    target: str,
    *,
    spec: str,
    layer: int | None = None,
    project: bool = True,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> tuple[TokenEncoder, tuple, tuple]:
    """Build the encoder for ``hf:MODEL_ID_OR_DIR``; returns (encoder, mean, std)."""
    source = os.path.expanduser(target)
    model, info = _load(source, spec, cache_dir, revision)
    missing = sorted(info.get("missing_keys", []))
    projection_missing = [key for key in missing if key.startswith("visual_projection")]
    if projection_missing and project:
        raise ValueError(
            f"{spec!r}: the checkpoint has no visual_projection weights (a CLIPVisionModel, not "
            f"...WithProjection), so projected targets would be random; use project=False"
        )
    other_missing = [key for key in missing if key not in projection_missing]
    if other_missing:
        raise ValueError(f"{spec!r}: the checkpoint lacks weights for {other_missing[:8]} ({len(other_missing)} in all)")
    mean, std = _normalisation(source, cache_dir)
    encoder = HFTokens(model, project=project, layer=layer, name=f"transformers model {target!r}")
    return encoder, mean, std
