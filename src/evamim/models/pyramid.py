"""The simple feature pyramid of a plain ViT (ViTDet): one stride-p map -> maps at strides p/4, p/2, p, 2p.

A plain ViT has a single scale; ViTDet showed that deconvolutions and a pooling of its last map are enough for
FPN-style heads. Two variants share the scale-changing part, each matching where it comes from:

- ``style="beit"`` (semantic segmentation: BEiT / mmseg's UPerNet on ViT): channels stay ``dim``; the x4 level
  is ConvTranspose -> BatchNorm -> GELU -> ConvTranspose, the x2 level one ConvTranspose, x1 the identity, x1/2
  a 2x2 max-pool. Each level may read a different block (four maps) or all the same one.
- ``style="vitdet"`` (detection: detectron2's ``SimpleFeaturePyramid``, EVA's detection configs): the
  deconvolutions halve the channels (x4: dim -> dim/2 -> LayerNorm -> GELU -> dim/4; x2: dim -> dim/2), then
  every level gets a 1x1 conv + LayerNorm and a 3x3 conv + LayerNorm to ``out_channels`` (no bias, no
  activation), all from the last block's map.

Maps are (B, C, h, w); LayerNorm here is over the channels at each position (detectron2's "LN").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PYRAMID_STYLES = ("beit", "vitdet")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, h, w) map, at each position (detectron2's ``LayerNorm``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def _deconv_levels(dim: int, style: str) -> list[nn.Module]:
    """The four scale changes (x4, x2, x1, x1/2) and the channels each level comes out with."""
    if style == "beit":
        x4 = [nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
              nn.ConvTranspose2d(dim, dim, 2, stride=2)]
        x2 = [nn.ConvTranspose2d(dim, dim, 2, stride=2)]
    else:
        x4 = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
              nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
        x2 = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)]
    return [nn.Sequential(*x4), nn.Sequential(*x2), nn.Identity(), nn.MaxPool2d(kernel_size=2, stride=2)]


class SimpleFeaturePyramid(nn.Module):
    """Stride-p maps -> four maps at strides p/4, p/2, p and 2p (see the module docstring for the styles).

    forward: a list of 4 (or 1) maps (B, dim, h, w) -> a list of 4 maps of sizes (4h, 4w), (2h, 2w), (h, w),
    (h // 2, w // 2), with ``dim`` channels (beit) or ``out_channels`` (vitdet).
    """

    scales = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, dim: int, style: str = "beit", out_channels: int | None = None):
        super().__init__()
        if style not in PYRAMID_STYLES:
            raise ValueError(f"unknown pyramid style {style!r}; choose one of {', '.join(PYRAMID_STYLES)}")
        if style == "vitdet" and (out_channels is None or dim % 4):
            raise ValueError(f"the vitdet pyramid needs out_channels and a width divisible by 4, got "
                             f"out_channels={out_channels}, dim={dim}")
        self.style = style
        self.levels = nn.ModuleList(_deconv_levels(dim, style))
        self.out_channels = dim if style == "beit" else out_channels
        self.outputs = None
        if style == "vitdet":
            self.outputs = nn.ModuleList(
                nn.Sequential(nn.Conv2d(channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                              nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
                for channels in (dim // 4, dim // 2, dim, dim)
            )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) == 1:
            features = list(features) * len(self.levels)
        if len(features) != len(self.levels):
            raise ValueError(f"SimpleFeaturePyramid takes 1 or {len(self.levels)} maps, got {len(features)}")
        maps = [level(x) for level, x in zip(self.levels, features)]
        if self.outputs is not None:
            maps = [output(x) for output, x in zip(self.outputs, maps)]
        return maps


__all__ = ["LayerNorm2d", "PYRAMID_STYLES", "SimpleFeaturePyramid"]
