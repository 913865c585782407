"""EvaViTConfig: everything needed to rebuild an :class:`~evamim.models.vit.EvaViT`, saved as config.json
next to the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

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
    window_size: int = 0
    """ViTDet window attention: every block not in ``global_blocks`` attends only within non-overlapping
    ``window_size`` x ``window_size`` windows of the patch grid, and the cls token is dropped after the position
    embedding (ViTDet), so such a model gives feature maps (``forward_intermediates``), not a pooled output.
    The weights are those of the global-attention model. 0 = global attention in every block."""
    global_blocks: tuple[int, ...] = ()
    """With ``window_size``: the blocks that keep global attention (ViTDet-B: 2, 5, 8, 11; EVA-g: 3, 7, ..., 39)."""

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
        self.global_blocks = tuple(int(i) for i in self.global_blocks)
        self._check_windows()

    def _check_windows(self) -> None:
        if self.window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0 = global attention), got {self.window_size}")
        if not self.window_size:
            if self.global_blocks:
                raise ValueError(f"global_blocks {list(self.global_blocks)} only apply with window attention: "
                                 "set window_size, or leave global_blocks empty")
            return
        bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_blocks {bad} out of range for depth {self.depth}")
        grid = self.grid_size
        if grid[0] % self.window_size or grid[1] % self.window_size:
            raise ValueError(
                f"the {grid[0]}x{grid[1]} patch grid (img_size {self.img_size[0]}x{self.img_size[1]}, patch "
                f"{self.patch_size}) is not a multiple of window_size {self.window_size}; choose a window size that "
                f"divides it (evamim does not pad windows: ViTDet's zero padding lets real tokens attend to padding)")

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
        return config_from_dict(cls, values)


def config_from_dict(cls: type, values: dict):
    """``cls(**values)`` for a config dataclass, refusing keys it does not have (with the valid ones) instead of
    a TypeError naming one of them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
    return cls(**values)
