"""Analytic parameter and FLOP counts for ViTs, used by the benchmarks for MFU.

Counts are multiply-accumulates (MACs) of the matrix products; FLOPs = 2 x MACs. Norms, softmax, activations
and residual adds are left out, as in fvcore / timm's published GMACs (EVA-g/14 at 224: 267.2 GMACs).
"""

from __future__ import annotations

from dataclasses import dataclass

from evamim.models.vit import EvaViTConfig


@dataclass(frozen=True)
class VitShape:
    """The shape facts a FLOP count needs, for EvaViT and for teacher ViTs alike."""

    embed_dim: int
    depth: int
    mlp_hidden_dim: int
    patch_size: int
    in_chans: int = 3
    swiglu: bool = False
    num_prefix_tokens: int = 1
    output_dim: int = 0
    """A projection applied to every patch token at the end (a CLIP teacher's proj, a MIM lm_head)."""

    @classmethod
    def from_config(cls, config: EvaViTConfig, output_dim: int | None = None) -> "VitShape":
        return cls(
            embed_dim=config.embed_dim,
            depth=config.depth,
            mlp_hidden_dim=config.mlp_hidden_dim,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            swiglu=config.swiglu,
            output_dim=(config.mim_head_dim or 0) if output_dim is None else output_dim,
        )


def vit_forward_macs(shape: VitShape, img_size: int | tuple[int, int], head_tokens: int | None = None) -> int:
    """Forward MACs of one image through a ViT.

    ``head_tokens``: how many tokens go through the output projection (all patch tokens by default;
    EVA's lm_head sees only the masked ones).
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    patches = (height // shape.patch_size) * (width // shape.patch_size)
    tokens = patches + shape.num_prefix_tokens
    dim, hidden = shape.embed_dim, shape.mlp_hidden_dim
    patch_embed = patches * dim * shape.in_chans * shape.patch_size**2
    qkv_and_proj = tokens * 4 * dim * dim
    attention = 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    mlp_in = tokens * dim * hidden * (2 if shape.swiglu else 1)
    mlp_out = tokens * hidden * dim
    blocks = shape.depth * (qkv_and_proj + attention + mlp_in + mlp_out)
    head = (patches if head_tokens is None else head_tokens) * dim * shape.output_dim
    return patch_embed + blocks + head


def forward_flops(config: EvaViTConfig, img_size: int | tuple[int, int] | None = None, head_tokens: int | None = 0) -> int:
    """Forward FLOPs (2 x MACs) of one image through an EvaViT; by default without the MIM head."""
    shape = VitShape.from_config(config)
    return 2 * vit_forward_macs(shape, img_size or config.img_size, head_tokens=head_tokens)


def count_parameters(model, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on meta-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
