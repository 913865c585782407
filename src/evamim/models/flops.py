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
    patches = _num_patches(shape, img_size)
    head = (patches if head_tokens is None else head_tokens) * shape.embed_dim * shape.output_dim
    return _patch_embed_macs(shape, patches) + blocks_macs(shape, patches + shape.num_prefix_tokens) + head


def _num_patches(shape: VitShape, img_size: int | tuple[int, int]) -> int:
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return (height // shape.patch_size) * (width // shape.patch_size)


def _patch_embed_macs(shape: VitShape, patches: int) -> int:
    return patches * shape.embed_dim * shape.in_chans * shape.patch_size**2


def blocks_macs(shape: VitShape, tokens: int) -> int:
    """MACs of ``shape.depth`` transformer blocks on a sequence of ``tokens`` tokens."""
    dim, hidden = shape.embed_dim, shape.mlp_hidden_dim
    qkv_and_proj = tokens * 4 * dim * dim
    attention = 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    mlp_in = tokens * dim * hidden * (2 if shape.swiglu else 1)
    mlp_out = tokens * hidden * dim
    return shape.depth * (qkv_and_proj + attention + mlp_in + mlp_out)


def mae_forward_flops(config: EvaViTConfig, decoder_depth: int, decoder_width: int, decoder_mlp_ratio: float,
                      num_masked: int, output_dim: int, img_size: int | tuple[int, int] | None = None) -> int:
    """Forward FLOPs of one image through an MAE-style student (objective clip_mae): the patch embedding on every
    patch, the encoder's blocks on cls + the visible patches, the decoder's input projection, its blocks on every
    position, and its output projection on the ``num_masked`` masked patches."""
    encoder = VitShape.from_config(config, output_dim=0)
    patches = _num_patches(encoder, img_size or config.img_size)
    decoder = VitShape(embed_dim=decoder_width, depth=decoder_depth, mlp_hidden_dim=int(decoder_width * decoder_mlp_ratio),
                       patch_size=1)
    visible_tokens = patches - num_masked + encoder.num_prefix_tokens
    macs = (_patch_embed_macs(encoder, patches) + blocks_macs(encoder, visible_tokens)
            + visible_tokens * encoder.embed_dim * decoder_width + blocks_macs(decoder, patches + 1)
            + num_masked * decoder_width * output_dim)
    return 2 * macs


def forward_flops(config: EvaViTConfig, img_size: int | tuple[int, int] | None = None, head_tokens: int | None = 0) -> int:
    """Forward FLOPs (2 x MACs) of one image through an EvaViT; by default without the MIM head."""
    shape = VitShape.from_config(config)
    return 2 * vit_forward_macs(shape, img_size or config.img_size, head_tokens=head_tokens)


def count_parameters(model, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on meta-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
