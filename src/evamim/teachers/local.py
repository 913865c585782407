"""``local:DIR`` teachers: an evamim model directory (``config.json`` + ``model.safetensors``) holding an
EvaViT or an EvaClip (``evamim.clip.save_clip``, ``"kind": "clip"`` in its config.json).

Targets of an EvaViT: the patch tokens of ``EvaViT.forward_features`` (cls dropped), then ``fc_norm`` -- an
identity unless the model was built with ``global_pool='avg'`` (where ``forward_features`` is un-normalised and
``fc_norm`` is the final norm). (B, N, embed_dim). There is no projection (``lm_head`` is the student's MIM
head, not a feature projection).

Targets of an EvaClip: the same tokens of its vision trunk, then the CLIP projection (``visual.trunk.head``),
token by token -- what open_clip teachers give (``ln_post(tokens) @ proj``): (B, N, clip embed_dim). Its
text tower is not kept. ``layer=k`` keeps blocks 0..k only, for both kinds.

The teacher's mean/std default to OpenAI CLIP's, what evamim students are trained with; pass
``mean=``/``std=`` when the directory's model was trained with another normalisation.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from evamim.teachers.base import CLIP_MEAN, CLIP_STD, TokenEncoder, keep_blocks
from evamim.teachers.errors import weights_not_found


class EvaTokens(TokenEncoder):
    """Patch tokens of an EvaViT: (B, 3, h*p, w*p) -> (B, h*w, embed_dim)."""

    def __init__(self, model: nn.Module, *, layer: int | None, name: str):
        super().__init__()
        self.name = name
        self.model = model
        self.patch_size = int(model.patch_embed.patch_size)
        self.native_grid = tuple(int(v) for v in model.grid_size)
        if layer is not None:
            model.blocks = keep_blocks(model.blocks, layer, name)
        self.embed_dim = int(model.embed_dim)

    def set_grid(self, grid: tuple[int, int]) -> None:
        from evamim.models.resample import set_input_size

        set_input_size(self.model, (grid[0] * self.patch_size, grid[1] * self.patch_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
        return model.fc_norm(tokens)


class ClipTokens(EvaTokens):
    """Projected patch tokens of an EvaClip's vision trunk: (B, 3, h*p, w*p) -> (B, h*w, clip embed_dim)."""

    def __init__(self, trunk: nn.Module, *, layer: int | None, name: str):
        super().__init__(trunk, layer=layer, name=name)
        self.embed_dim = int(trunk.head.out_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The trunk's head is the CLIP projection; applied to each token as the tower applies it to the pooled one.
        return self.model.head(super().forward(images))


def check(target: str, *, spec: str, layer: int | None = None) -> int:
    """What can be refused before loading: a directory that does not exist or holds no evamim config, a
    ``layer`` out of range. Returns the target width D: the EvaViT's width, or an EvaClip's joint width."""
    from evamim.clip.checkpoint import is_clip_directory, read_clip_config
    from evamim.models.checkpoint import read_config

    directory = os.path.expanduser(target)
    if not os.path.exists(directory):
        raise weights_not_found(spec, [f"evamim model directory {directory}: it does not exist"])
    if is_clip_directory(directory):
        clip = read_clip_config(directory)
        if layer is not None:
            keep_blocks([None] * clip.depth, layer, f"EvaClip model {directory!r}")
        return int(clip.embed_dim)
    config = read_config(directory)  # FileNotFoundError naming what is missing when it is not an evamim directory
    if layer is not None:
        keep_blocks([None] * config.depth, layer, f"evamim model {directory!r}")
    return int(config.embed_dim)


def build(target: str, *, spec: str, layer: int | None = None) -> tuple[TokenEncoder, tuple, tuple]:
    """Build the encoder for ``local:DIR``; returns (encoder, mean, std)."""
    from evamim.clip.checkpoint import is_clip_directory, load_clip
    from evamim.models.checkpoint import load_pretrained

    directory = os.path.expanduser(target)
    if not os.path.exists(directory):
        raise weights_not_found(spec, [f"evamim model directory {directory}: it does not exist"])
    if is_clip_directory(directory):
        trunk = load_clip(directory).visual.trunk  # the text tower is dropped with the rest of the model
        return ClipTokens(trunk, layer=layer, name=f"EvaClip model {directory!r}"), CLIP_MEAN, CLIP_STD
    model = load_pretrained(directory)
    encoder = EvaTokens(model, layer=layer, name=f"evamim model {directory!r}")
    return encoder, CLIP_MEAN, CLIP_STD
