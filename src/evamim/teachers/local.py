"""``local:DIR`` teachers: an evamim model directory (``config.json`` + ``model.safetensors``).

Targets: the patch tokens of ``EvaViT.forward_features`` (cls dropped), then ``fc_norm`` -- an identity
unless the model was built with ``global_pool='avg'`` (where ``forward_features`` is un-normalised and
``fc_norm`` is the final norm). (B, N, embed_dim). ``layer=k`` keeps blocks 0..k only.
There is no projection (``lm_head`` is the student's MIM head, not a feature projection).

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


def check(target: str, *, spec: str, layer: int | None = None) -> int:
    """What can be refused before loading: a directory that does not exist or holds no evamim config, a
    ``layer`` out of range. Returns the target width D."""
    from evamim.models.checkpoint import read_config

    directory = os.path.expanduser(target)
    if not os.path.exists(directory):
        raise weights_not_found(spec, [f"evamim model directory {directory}: it does not exist"])
    config = read_config(directory)  # FileNotFoundError naming what is missing when it is not an evamim directory
    if layer is not None:
        keep_blocks([None] * config.depth, layer, f"evamim model {directory!r}")
    return int(config.embed_dim)


def build(target: str, *, spec: str, layer: int | None = None) -> tuple[TokenEncoder, tuple, tuple]:
    """Build the encoder for ``local:DIR``; returns (encoder, mean, std)."""
    from evamim.models.checkpoint import load_pretrained

    directory = os.path.expanduser(target)
    if not os.path.exists(directory):
        raise weights_not_found(spec, [f"evamim model directory {directory}: it does not exist"])
    model = load_pretrained(directory)
    encoder = EvaTokens(model, layer=layer, name=f"evamim model {directory!r}")
    return encoder, CLIP_MEAN, CLIP_STD
