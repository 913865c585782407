"""MAE-style EVA pre-training (``objective: clip_mae``): the encoder sees only the visible patches, a light
decoder predicts the teacher's features at the masked ones.

This is how EVA's authors trained EVA-L against a CLIP teacher (REFERENCE section 4: 75 % random masks, a
4-layer 512-wide decoder). At 75 % masking the encoder runs on a quarter of the tokens.

Tensor conventions (B images, N = h * w patches, K visible and M = N - K masked per image, the same K for
every image):
- ``masks``: (B, N) bool, True = masked (the batch's usual masks).
- ``visible``: (B, K) long, ``masked``: (B, M) long: row-major patch indices, each ascending
  (:func:`mask_indices`).
- encoder output (B, 1 + K, C); decoder output (B, M, D) in the order of ``masked``.

The encoder is an ordinary :class:`~evamim.models.vit.EvaViT` (no mask token, no lm_head): its weights are
what ``evamim pretrain`` exports, and they load into every downstream task like a BEiT-style student's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evamim.models.vit import Block, EvaViT, EvaViTConfig


@dataclass
class DecoderConfig:
    """The MAE decoder (EVA-L's: 4 blocks, 512 wide; MAE's own: 8 blocks, 512 wide, 16 heads)."""

    depth: int = 4
    width: int = 512
    num_heads: int = 16
    mlp_ratio: float = 4.0

    def problems(self, prefix: str = "decoder") -> list[str]:
        found = []
        if self.depth < 1:
            found.append(f"{prefix}.depth must be >= 1, got {self.depth}")
        if self.width < 1 or self.num_heads < 1 or self.width % self.num_heads:
            found.append(f"{prefix}.width ({self.width}) must be a positive multiple of {prefix}.num_heads "
                         f"({self.num_heads})")
        elif self.width % 4:
            found.append(f"{prefix}.width must be a multiple of 4 (its sin-cos position embedding), got {self.width}")
        if not self.mlp_ratio > 0:
            found.append(f"{prefix}.mlp_ratio must be > 0, got {self.mlp_ratio}")
        return found


def sincos_pos_embed(width: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding with a zero row for the cls token: (1 + h * w, width).

    Half the channels encode the row, half the column, each as [sin, cos] of 1 / 10000^(i / (width / 4))
    (``get_2d_sincos_pos_embed`` in MAE's ``util/pos_embed.py``, which puts the column (w) half first).
    """
    if width % 4:
        raise ValueError(f"the decoder width must be a multiple of 4 for the sin-cos position embedding, got {width}")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
    rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64),
                             indexing="ij")

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    table = np.concatenate([np.zeros((1, width)), table], axis=0)
    return torch.from_numpy(table).float()


def mask_indices(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool, True = masked -> ``visible`` (B, K) and ``masked`` (B, M) long indices, each ascending.

    Every image must have the same number of masked patches; this is checked, which costs a device sync when
    ``masks`` is on a GPU (the pre-training step calls this on the CPU batch, before it is moved).
    """
    if masks.dtype != torch.bool or masks.ndim != 2:
        raise TypeError(f"masks must be a (batch, patches) bool tensor, got {masks.dtype} {tuple(masks.shape)}")
    counts = masks.sum(dim=1)
    if len(counts) and bool((counts != counts[0]).any()):
        raise ValueError(
            f"clip_mae needs the same number of masked patches in every image, got {int(counts.min())} to "
            f"{int(counts.max())}: use masking.kind=random, or block masks filled to their budget (the pre-training "
            "task does this for clip_mae)"
        )
    num_visible = masks.shape[1] - (int(counts[0]) if len(counts) else 0)
    # A stable sort of 0 (visible) / 1 (masked) keeps each group in ascending patch order.
    order = torch.sort(masks.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :num_visible], order[:, num_visible:]


def add_mask_indices(batch: dict) -> dict:
    """The batch with ``visible`` and ``masked`` indices computed from its ``masks`` (see :func:`mask_indices`);
    a batch that has them already is returned as it is.

    Called on the CPU batch by the pre-training step, so the GPU never has to report how many patches are masked.
    """
    if "visible" in batch and "masked" in batch:
        return batch
    visible, masked = mask_indices(batch["masks"])
    return {**batch, "visible": visible, "masked": masked}


class MaeDecoder(nn.Module):
    """Encoder tokens (B, 1 + K, C) -> predictions (B, M, out_dim) at the masked patches.

    ``embed`` projects to the decoder width, a learned ``mask_token`` fills the masked positions, the fixed
    sin-cos position embedding (MAE's) is added to every token, then ``depth`` transformer blocks (EvaViT's
    pre-norm block), ``norm`` and ``pred``. Only the masked positions go through ``pred``.
    """

    def __init__(self, encoder_dim: int, grid: tuple[int, int], out_dim: int, config: DecoderConfig | None = None,
                 norm_eps: float = 1e-6):
        super().__init__()
        config = config or DecoderConfig()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.grid = tuple(grid)
        width = config.width
        block_config = EvaViTConfig(embed_dim=width, depth=config.depth, num_heads=config.num_heads,
                                    mlp_ratio=config.mlp_ratio, qkv_bias=True, norm_eps=norm_eps,
                                    img_size=(self.grid[0], self.grid[1]), patch_size=1)
        self.embed = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed(width, self.grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(block_config, 0.0) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.pred = nn.Linear(width, out_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's decoder init: xavier-uniform linear weights, zero biases, unit norms, mask token N(0, 0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        batch, num_patches, width = x.shape[0], self.pos_embed.shape[1] - 1, x.shape[-1]
        if visible.shape[1] + masked.shape[1] != num_patches:
            raise ValueError(f"{visible.shape[1]} visible + {masked.shape[1]} masked patches do not make the decoder's "
                             f"{self.grid[0]}x{self.grid[1]} grid")
        # Put each visible token back at its place; every other place holds the mask token.
        patches = self.mask_token.to(x.dtype).expand(batch, num_patches, width)
        patches = patches.scatter(1, visible.unsqueeze(-1).expand(-1, -1, width), x[:, 1:])
        x = torch.cat((x[:, :1], patches), dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]
        return self.pred(x.gather(1, masked.unsqueeze(-1).expand(-1, -1, width)))


class MaeStudent(nn.Module):
    """The ``clip_mae`` student: ``encoder`` (an EvaViT, the part that is exported) + ``decoder``."""

    def __init__(self, encoder: EvaViT, decoder: MaeDecoder):
        super().__init__()
        if tuple(decoder.grid) != tuple(encoder.grid_size):
            raise ValueError(f"the decoder's grid {decoder.grid} is not the encoder's {encoder.grid_size}")
        self.encoder = encoder
        self.decoder = decoder

    def rebuilt(self) -> "MaeStudent":
        """A new student of the same architecture (freshly initialised; build it under ``torch.device("meta")``
        to get an empty one to load a state dict into, as the runner does after FSDP)."""
        decoder = self.decoder
        return MaeStudent(EvaViT(self.encoder.config),
                          MaeDecoder(decoder.embed.in_features, decoder.grid, decoder.pred.out_features, decoder.config,
                                     decoder.norm.eps))

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block (encoder then decoder): the units FSDP shards."""
        return [*self.encoder.blocks, *self.decoder.blocks]

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"decoder.mask_token"}

    def num_layers(self) -> int:
        return self.encoder.num_layers()

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay: the encoder's own numbering; the decoder sits on top, with the heads."""
        if name.startswith("encoder."):
            return self.encoder.layer_id(name[len("encoder."):])
        return self.encoder.num_layers() + 1

    def forward(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, K), (B, M) -> predictions (B, M, D) at the ``masked`` patches."""
        return self.decoder(self.encoder.forward_visible(images, visible), visible, masked)
