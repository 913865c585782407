"""EvaViT: the plain ViT of EVA-01, with the EVA-02 options (2-D RoPE, SwiGLU, sub-LN, layer scale) and the
post-norm blocks of EVA02-E.

Conventions used throughout:
- Images are (B, 3, H, W), normalised by the caller (CLIP mean/std for EVA).
- Token sequences are (B, 1 + N, C): the cls token first, then N = (H/p) * (W/p) patch tokens in
  row-major order of the patch grid.
- A MIM mask is a bool tensor (B, N) with True = masked: the patch token at that position is replaced
  by the learned ``mask_token`` before positional embeddings are added (EVA / BEiT).

Parameter names follow the official EVA-01 checkpoints and timm's ``Eva`` (``blocks.{i}.attn.qkv.weight``,
``q_bias``, ``v_bias``, ``norm``/``fc_norm``, ``lm_head``), so weights move between them with renames only
where EVA-02 differs (see ``layouts.py``).

The config lives in :mod:`~evamim.models.vit_config`, the layers (attention, MLP, block, RoPE, patch embedding)
in :mod:`~evamim.models.vit_layers`; both are re-exported here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from evamim.models.resample import resample_pos_embed
from evamim.models.vit_config import GLOBAL_POOLS, EvaViTConfig
from evamim.models.vit_layers import (
    Attention,
    Block,
    Mlp,
    PatchEmbed,
    RotaryEmbedding2d,
    Windows,
    apply_rope,
    drop_path,
)


class EvaViT(nn.Module):
    """The EVA vision transformer. See the module docstring for tensor conventions.

    Stages: ``forward_features`` (tokens after the final norm), ``forward_head`` (pool, fc_norm, head),
    ``forward_intermediates`` (per-block outputs), and ``lm_head`` for MIM on masked tokens.
    """

    def __init__(self, config: EvaViTConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = EvaViTConfig(**overrides)
        elif overrides:
            config = EvaViTConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        dim = config.embed_dim
        self.num_prefix_tokens = 1
        self.num_features = self.embed_dim = dim
        self.grid_size = config.grid_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_mask_token else None
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim)) if config.use_abs_pos_emb else None
        head_dim = dim // config.num_heads
        self.rope = (
            RotaryEmbedding2d(head_dim, self.grid_size, config.rope_ref_grid, config.rope_temperature)
            if config.use_rope
            else None
        )
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.Identity() if config.fc_norm else nn.LayerNorm(dim, eps=config.norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.fc_norm else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.lm_head = nn.Linear(dim, config.mim_head_dim) if config.mim_head_dim else None
        self.grad_checkpointing = config.grad_checkpointing
        self.init_weights()

    # ----------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """EVA init: trunc-normal(std) on Linear/conv/pos/cls/mask, zero biases, unit LayerNorms, then
        ``attn.proj`` and ``mlp.fc2`` weights divided by sqrt(2 * layer_id) and the class head scaled down."""
        std = self.config.init_std

        def trunc_normal(tensor: torch.Tensor) -> None:
            # Bounds are absolute (+-2), as in BEiT/EVA: with std 0.015 nothing is truncated in practice.
            nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for parameter in (self.pos_embed, self.cls_token, self.mask_token):
            if parameter is not None:
                trunc_normal(parameter)
        for layer_id, block in enumerate(self.blocks, start=1):
            scale = math.sqrt(2.0 * layer_id)
            block.attn.proj.weight.div_(scale)
            block.mlp.fc2.weight.div_(scale)
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(self.config.head_init_scale)
            self.head.bias.mul_(self.config.head_init_scale)

    # ------------------------------------------------------------------------- optimizer hooks
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D ones (biases, norms)."""
        return {"pos_embed", "cls_token", "mask_token"}

    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 = embeddings, block i -> i + 1, norms/heads -> depth + 1."""
        if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # -------------------------------------------------------------------------------- forward
    def _embed(self, images: torch.Tensor, mask: torch.Tensor | None):
        """Patchify, apply the mask token, prepend cls, add positions. Returns tokens, rope tables and grid."""
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        if grid != self.grid_size and not self.config.dynamic_img_size:
            raise ValueError(
                f"input {images.shape[-2]}x{images.shape[-1]} gives a {grid[0]}x{grid[1]} patch grid but the model "
                f"was built for {self.grid_size[0]}x{self.grid_size[1]}; build it with dynamic_img_size=True, or "
                f"change its size with evamim.models.resample.set_input_size(model, img_size)"
            )
        x = self.patch_embed(images)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but the model has no mask token; build it with use_mask_token=True")
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match (batch, patches) {tuple(x.shape[:2])}")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.pos_embed is not None:
            pos_embed = self.pos_embed
            if grid != self.grid_size:
                pos_embed = resample_pos_embed(
                    pos_embed, grid, self.grid_size, num_prefix_tokens=1, antialias=self.config.pos_embed_antialias
                )
            x = x + pos_embed
        rope = self.rope(grid) if self.rope is not None else None
        return x, rope, grid

    def _run_block(self, block: Block, x: torch.Tensor, rope, window: Windows | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope, window, use_reentrant=False)
        return block(x, rope, window)

    @property
    def windowed(self) -> bool:
        """Window attention (``config.window_size``): patch tokens only, feature maps only."""
        return self.config.window_size > 0

    def _refuse_windowed(self, what: str) -> None:
        if self.windowed:
            raise ValueError(f"{what} needs global attention with the cls token, but this model has window attention "
                             f"(window_size={self.config.window_size}, ViTDet-style: no cls token); use "
                             "forward_intermediates for feature maps, or build the model with window_size=0")

    def _run_blocks(self, x: torch.Tensor, rope, grid: tuple[int, int], take: Sequence[int] = (),
                    stop_early: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All blocks (or those up to ``max(take)`` with ``stop_early``): the last one's tokens and the outputs
        of the blocks ``take``.

        Windowed models: x holds patch tokens only; blocks outside ``global_blocks`` attend within windows, with
        the RoPE tables of one window's grid (EVA-02's detection backbone: ``rope_win``)."""
        # (windows, RoPE tables) of the global blocks, and of the others
        global_attention = local_attention = (None, rope)
        if self.windowed:
            size = self.config.window_size
            global_attention = (Windows(grid, grid), rope)  # patch tokens only: one window of the whole grid
            local_attention = (Windows(grid, size), self.rope((size, size)) if self.rope is not None else None)
        global_blocks = set(self.config.global_blocks)
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        outputs = []
        for index, block in enumerate(blocks):
            windows, tables = global_attention if index in global_blocks else local_attention
            x = self._run_block(block, x, tables, windows)
            if index in take:
                outputs.append(x)
        return x, outputs

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W), mask (B, N) bool with True = masked -> tokens (B, 1 + N, C) after the final norm
        (``norm`` is an identity in models with ``fc_norm``, i.e. global_pool='avg' by default)."""
        self._refuse_windowed("forward_features")
        x, rope, grid = self._embed(images, mask)
        x, _ = self._run_blocks(x, rope, grid)
        return self.norm(x)

    def forward_visible(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """MAE-style encoding: images (B, 3, H, W) and ``visible`` (B, K) long patch indices (row-major, the same
        count K for every image) -> tokens (B, 1 + K, C) after the final norm, cls first, then the visible patches
        in the order given.

        The masked patches are dropped after the position embedding (absolute and RoPE alike follow each token),
        so each visible token carries the position it has in the full grid; blocks then see only 1 + K tokens.
        Needs no mask token.
        """
        self._refuse_windowed("forward_visible")
        x, rope, grid = self._embed(images, None)
        if visible.ndim != 2 or visible.shape[0] != x.shape[0] or visible.dtype != torch.long:
            raise ValueError(f"visible must be (batch, K) long patch indices, got {tuple(visible.shape)} {visible.dtype}")
        index = visible.unsqueeze(-1)
        x = torch.cat((x[:, :1], x[:, 1:].gather(1, index.expand(-1, -1, x.shape[-1]))), dim=1)
        if rope is not None:
            # (N, D) tables -> (B, 1, K, D): each image's visible positions, broadcast over the heads.
            sin, cos = rope
            rope = tuple(table[visible].unsqueeze(1) for table in (sin, cos))
        for block in self.blocks:
            x = self._run_block(block, x, rope)
        return self.norm(x)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        mask: torch.Tensor | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Outputs of selected blocks, following timm's ``forward_intermediates`` contract.

        indices: an int n takes the last n blocks; a sequence takes those block indices (negative allowed).
        Each intermediate is (B, C, h, w) for 'NCHW' or (B, N, C) for 'NLC', without the cls token unless
        ``return_prefix_tokens`` (then (spatial, (B, 1, C)) pairs). ``norm`` applies the final norm to each.
        Returns the list alone with ``intermediates_only``, else (final tokens (B, 1 + N, C), list).

        A windowed model (``window_size``) has no cls token: the final tokens are (B, N, C) and
        ``return_prefix_tokens`` is refused.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if return_prefix_tokens:
            self._refuse_windowed("return_prefix_tokens")
        take = feature_take_indices(len(self.blocks), indices)
        x, rope, grid = self._embed(images, mask)
        prefix_tokens = 1
        if self.windowed:
            x, prefix_tokens = x[:, 1:], 0  # ViTDet drops the cls token (and its position) before the blocks
        x, intermediates = self._run_blocks(x, rope, grid, take, stop_early)
        intermediates = [self.norm(y) if norm else y for y in intermediates]
        prefix = [y[:, :1] for y in intermediates]
        spatial = [y[:, prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            spatial = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
        outputs = list(zip(spatial, prefix)) if return_prefix_tokens else spatial
        if intermediates_only:
            return outputs
        return self.norm(x), outputs

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, C) -> (B, C) for 'avg' / 'token'; unchanged for ''."""
        if self.config.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.config.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features (B, 1 + N, C) -> logits (B, num_classes), or the pooled (B, C) with ``pre_logits``."""
        x = self.fc_norm(self.pool(features))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def extra_repr(self) -> str:
        c = self.config
        return f"patch={c.patch_size}, img={c.img_size}, dim={c.embed_dim}, depth={c.depth}, heads={c.num_heads}"


def feature_take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices to return: None -> all, n -> the last n, a sequence -> those (negative from the end)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"cannot take the last {indices} of {depth} blocks")
        return list(range(depth - indices, depth))
    taken = [i + depth if i < 0 else i for i in indices]
    bad = [i for i in taken if not 0 <= i < depth]
    if bad:
        raise ValueError(f"block indices {list(indices)} out of range for depth {depth}")
    return taken


__all__ = [
    "GLOBAL_POOLS",
    "Attention",
    "Block",
    "EvaViT",
    "EvaViTConfig",
    "Mlp",
    "PatchEmbed",
    "RotaryEmbedding2d",
    "Windows",
    "apply_rope",
    "drop_path",
    "feature_take_indices",
]
