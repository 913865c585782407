"""The layers of EvaViT: patch embedding, attention with 2-D RoPE, MLP / SwiGLU, the transformer block and
stochastic depth. Tensor conventions as in :mod:`evamim.models.vit`: tokens are (B, 1 + N, C), cls first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evamim.models.vit_config import EvaViTConfig


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class RotaryEmbedding2d(nn.Module):
    """Axial 2-D RoPE of EVA-02 (timm's RotaryEmbeddingCat with in_pixels=False, interleaved pairs).

    For a head dim D, D/4 frequencies 1 / T^(i / (D/4)) are applied to the row and the column coordinate
    (scaled to ``ref_grid`` when given), giving (N, D) sin and cos tables with each value repeated twice
    for the interleaved (x0, x1) rotation pairs.
    """

    def __init__(self, head_dim: int, grid: tuple[int, int], ref_grid: tuple[int, int] | None, temperature: float):
        super().__init__()
        self.head_dim = head_dim
        self.ref_grid = ref_grid
        self.temperature = temperature
        self.grid = grid
        sin, cos = self.tables(grid)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("cos", cos, persistent=False)

    def tables(self, grid: tuple[int, int], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, head_dim) sin and cos tables for a patch grid, in fp32."""
        num_bands = self.head_dim // 4
        exponent = torch.arange(num_bands, device=device, dtype=torch.float32) / num_bands
        bands = 1.0 / (self.temperature**exponent)
        coords = [torch.arange(size, device=device, dtype=torch.float32) for size in grid]
        if self.ref_grid is not None:
            coords = [c / size * ref for c, size, ref in zip(coords, grid, self.ref_grid)]
        positions = torch.stack(torch.meshgrid(coords, indexing="ij"), dim=-1)  # (H, W, 2)
        angles = (positions.unsqueeze(-1) * bands).flatten(-2).flatten(0, 1)  # (N, 2 * num_bands)
        return angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)

    def forward(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(grid) == tuple(self.grid) and self.sin.device.type != "meta":
            return self.sin, self.cos
        return self.tables(grid, device=self.sin.device)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). x: (..., N, D); sin/cos: (N, D)."""
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).reshape(x.shape)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused (3C, C) qkv weight ([q; k; v] rows), q/v biases and a zero k bias."""

    def __init__(self, config: EvaViTConfig):
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = dim // config.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if config.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        else:
            self.q_bias = self.v_bias = self.k_bias = None
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.sub_ln_attn else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                window: Windows | None = None) -> torch.Tensor:
        """x: (B, 1 + N, C) -> (B, 1 + N, C). RoPE, when given, rotates q and k of the patch tokens only.

        With ``window`` (window attention, ViTDet): x is (B, N, C), patch tokens only, in row-major grid order;
        each token attends within its window, and ``rope`` holds the tables of one window's grid.
        """
        batch, prefix = x.shape[0], 1
        if window is not None:
            x, prefix = window.partition(x), 0
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(*x.shape[:2], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, 1 + N, head_dim)
        if rope is not None:
            sin, cos = rope
            q = torch.cat((q[:, :, :prefix], apply_rope(q[:, :, prefix:], sin, cos)), dim=2).type_as(v)
            k = torch.cat((k[:, :, :prefix], apply_rope(k[:, :, prefix:], sin, cos)), dim=2).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim ** -0.5
        x = x.transpose(1, 2).flatten(2)  # (B, 1 + N, C), or (B * windows, size * size, C)
        if window is not None:
            x = window.merge(x, batch)
        return self.proj(self.norm(x))


class Windows:
    """Non-overlapping windows of ``size`` (an int for squares, or (height, width)) over an (h, w) patch grid:
    ViTDet's window attention, without padding (``size`` divides the grid). A window of the whole grid is global
    attention over the patch tokens (the global blocks of a windowed model, which has no cls token)."""

    def __init__(self, grid: tuple[int, int], size: int | tuple[int, int]):
        size = (size, size) if isinstance(size, int) else tuple(size)
        if grid[0] % size[0] or grid[1] % size[1]:
            raise ValueError(f"a {grid[0]}x{grid[1]} patch grid cannot be cut into {size[0]}x{size[1]} windows; give "
                             f"an input whose patch grid is a multiple of the window (the model's img_size)")
        self.grid, self.size = tuple(grid), size

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h * w, C) in row-major grid order -> (B * windows, size_h * size_w, C), each window row-major."""
        (h, w), (sh, sw), channels = self.grid, self.size, x.shape[-1]
        x = x.reshape(x.shape[0], h // sh, sh, w // sw, sw, channels).transpose(2, 3)
        return x.reshape(-1, sh * sw, channels)

    def merge(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """The inverse of :meth:`partition`: (B * windows, size_h * size_w, C) -> (B, h * w, C)."""
        (h, w), (sh, sw), channels = self.grid, self.size, x.shape[-1]
        x = x.reshape(batch, h // sh, w // sw, sh, sw, channels).transpose(2, 3)
        return x.reshape(batch, h * w, channels)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> [sub-LN] -> fc2, or SwiGLU with a packed fc1 of (2 * hidden, C) rows [gate; value]."""

    def __init__(self, config: EvaViTConfig):
        super().__init__()
        dim, hidden = config.embed_dim, config.mlp_hidden_dim
        self.swiglu = config.swiglu
        # Packing gate and value rows into one matrix makes SwiGLU one GEMM instead of two.
        self.fc1 = nn.Linear(dim, 2 * hidden if config.swiglu else hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.norm_eps) if config.sub_ln_mlp else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.swiglu:
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        else:
            x = F.gelu(x)
        return self.fc2(self.norm(x))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then + mlp(norm2(x)), each optionally layer-scaled.
    With ``config.post_norm``: x + norm1(attn(x)), then + norm2(mlp(x)) (same parameters)."""

    def __init__(self, config: EvaViTConfig, drop_path_rate: float):
        super().__init__()
        dim = config.embed_dim
        self.post_norm = config.post_norm
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(config)
        self.drop_path_rate = drop_path_rate
        if config.layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                window: Windows | None = None) -> torch.Tensor:
        """x: (B, 1 + N, C), or (B, N, C) patch tokens with ``window`` (see :meth:`Attention.forward`). Only the
        attention is windowed: norms, MLP and stochastic depth act per token and per image, as in ViTDet."""
        # Post-norm (EVA02-E) normalises what each branch returns; pre-norm normalises what it reads.
        branch = self.norm1(self.attn(x, rope, window)) if self.post_norm else self.attn(self.norm1(x), rope, window)
        if self.gamma_1 is not None:
            branch = self.gamma_1 * branch
        x = x + drop_path(branch, self.drop_path_rate, self.training)
        branch = self.norm2(self.mlp(x)) if self.post_norm else self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            branch = self.gamma_2 * branch
        return x + drop_path(branch, self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """Conv patchify with bias: (B, C_in, H, W) -> (B, H/p * W/p, C), row-major over the grid."""

    def __init__(self, config: EvaViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input {height}x{width} is not divisible by the patch size {self.patch_size}; "
                f"resize or crop it to a multiple of {self.patch_size}"
            )
        return (height // self.patch_size, width // self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)
