"""Changing a model's resolution or patch size: pos-embed and patch-kernel resampling.

Official EVA code resizes position embeddings with bicubic interpolation and no antialiasing; timm
antialiases. They agree when upsampling (224 -> 336) and differ by up to ~0.4 on random embeddings when
downsampling, so the choice is explicit here (off by default, like the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    antialias: bool = False,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resize a (1, prefix + h*w, C) position embedding to (1, prefix + H*W, C).

    The prefix (cls) slots are kept as they are; the grid part is interpolated in fp32 and cast back.
    ``old_grid`` defaults to a square grid.
    """
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(num_grid_tokens**0.5))
        if side * side != num_grid_tokens:
            raise ValueError(f"pos_embed has {num_grid_tokens} grid tokens, not a square: pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid_tokens:
        raise ValueError(f"pos_embed has {num_grid_tokens} grid tokens but old_grid {old_grid} needs {old_grid[0] * old_grid[1]}")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)


def resample_patch_kernel(weight: torch.Tensor, new_size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Resize a (C_out, C_in, p, p) patch-embedding kernel to a new patch size (e.g. EVA's 14 -> 16).

    FlexiViT's pseudo-inverse resize (timm's implementation): the new kernel applied to a patch resized to
    the new size gives the same output as the old kernel on the original patch, in the least-squares sense.
    """
    from evamim import _compat  # noqa: F401  (timm imports torchvision)
    from timm.layers import resample_patch_embed

    if tuple(weight.shape[-2:]) == tuple(new_size):
        return weight
    resampled = resample_patch_embed(weight.float(), list(new_size), interpolation="bicubic", antialias=antialias)
    return resampled.to(weight.dtype)


@torch.no_grad()
def set_input_size(model: nn.Module, img_size: int | tuple[int, int], antialias: bool | None = None) -> None:
    """Rebuild ``model`` (an EvaViT) for a new input resolution in place: pos_embed is resampled and kept as a
    parameter, RoPE tables are rebuilt, and the config records the new size (so save_pretrained keeps it)."""
    from evamim.models.vit import EvaViTConfig, RotaryEmbedding2d

    config = model.config
    new_config = EvaViTConfig.from_dict({**config.to_dict(), "img_size": img_size})
    antialias = config.pos_embed_antialias if antialias is None else antialias
    if model.pos_embed is not None:
        resized = resample_pos_embed(model.pos_embed.data, new_config.grid_size, config.grid_size, antialias=antialias)
        model.pos_embed = nn.Parameter(resized, requires_grad=model.pos_embed.requires_grad)
    if model.rope is not None:
        rope = model.rope
        model.rope = RotaryEmbedding2d(rope.head_dim, new_config.grid_size, rope.ref_grid, rope.temperature).to(
            rope.sin.device
        )
    model.config = new_config
    model.grid_size = new_config.grid_size
