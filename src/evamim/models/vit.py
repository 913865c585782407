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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evamim.models.resample import resample_pos_embed

GLOBAL_POOLS = ("avg", "token", "")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    height, width = value
    return (int(height), int(width))


@dataclass
class EvaViTConfig:
    """Everything needed to rebuild an EvaViT; saved as config.json next to the weights."""

    img_size: int | tuple[int, int] = 224
    """Input resolution the model is built for (pos_embed grid = img_size / patch_size)."""
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    """MLP hidden size = int(embed_dim * mlp_ratio), as timm computes it (EVA-g: 6144 / 1408)."""
    qkv_bias: bool = True
    """BEiT-style q_bias and v_bias; the k bias is a fixed zero."""
    norm_eps: float = 1e-6
    global_pool: str = "avg"
    """'avg' (mean of patch tokens, then fc_norm), 'token' (cls token after the final norm) or '' (none)."""
    use_fc_norm: bool | None = None
    """None: fc_norm iff global_pool == 'avg' (timm's rule). With fc_norm the final ``norm`` is skipped."""
    num_classes: int = 0
    head_init_scale: float = 0.001
    mim_head_dim: int | None = None
    """Output size of ``lm_head`` (768 for a CLIP ViT-L/14 teacher's projected features); None = no MIM head."""
    use_mask_token: bool = False
    use_abs_pos_emb: bool = True
    use_rope: bool = False
    """EVA-02: 2-D rotary embeddings on q and k of patch tokens (not the cls token)."""
    rope_ref_grid: tuple[int, int] | None = None
    """Grid the RoPE coordinates are scaled to (EVA-02: (16, 16)); None = the model's own grid."""
    rope_temperature: float = 10000.0
    swiglu: bool = False
    sub_ln_attn: bool = False
    """EVA-02 sub-LN inside attention, before the output projection."""
    sub_ln_mlp: bool = False
    """EVA-02 sub-LN inside the MLP, before fc2."""
    layer_scale_init: float | None = None
    post_norm: bool = False
    """Post-norm blocks (EVA02-E; timm ``use_post_norm``): ``x + norm1(attn(x))`` then ``x + norm2(mlp(x))``
    instead of ``x + attn(norm1(x))``. Layer scale, if set, multiplies the normalised branch (official EVA-CLIP).
    The parameter names are the same as pre-norm ones, so weights cannot say which a model is."""
    drop_path_rate: float = 0.0
    init_std: float = 0.015
    dynamic_img_size: bool = False
    """Accept any input size divisible by the patch size, resampling pos_embed (and RoPE) on the fly."""
    pos_embed_antialias: bool = False
    """Antialias when resampling pos_embed: off matches the official EVA code, on matches timm."""
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size)
        if self.rope_ref_grid is not None:
            self.rope_ref_grid = _pair(self.rope_ref_grid)
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.use_rope and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"RoPE needs a head dim divisible by 4, got {self.embed_dim // self.num_heads}")
        for size in self.img_size:
            if size % self.patch_size:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.use_fc_norm is None else self.use_fc_norm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EvaViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EvaViTConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, 1 + N, C) -> (B, 1 + N, C). RoPE, when given, rotates q and k of the patch tokens only."""
        batch, tokens, dim = x.shape
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, 1 + N, head_dim)
        if rope is not None:
            sin, cos = rope
            q = torch.cat((q[:, :, :1], apply_rope(q[:, :, 1:], sin, cos)), dim=2).type_as(v)
            k = torch.cat((k[:, :, :1], apply_rope(k[:, :, 1:], sin, cos)), dim=2).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim ** -0.5
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(self.norm(x))


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # Post-norm (EVA02-E) normalises what each branch returns; pre-norm normalises what it reads.
        branch = self.norm1(self.attn(x, rope)) if self.post_norm else self.attn(self.norm1(x), rope)
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

    def _run_block(self, block: Block, x: torch.Tensor, rope) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W), mask (B, N) bool with True = masked -> tokens (B, 1 + N, C) after the final norm
        (``norm`` is an identity in models with ``fc_norm``, i.e. global_pool='avg' by default)."""
        x, rope, _ = self._embed(images, mask)
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
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = feature_take_indices(len(self.blocks), indices)
        x, rope, grid = self._embed(images, mask)
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        intermediates = []
        for index, block in enumerate(blocks):
            x = self._run_block(block, x, rope)
            if index in take:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :1] for y in intermediates]
        spatial = [y[:, 1:] for y in intermediates]
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


__all__ = ["EvaViT", "EvaViTConfig", "feature_take_indices"]
