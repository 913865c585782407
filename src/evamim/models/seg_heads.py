"""Semantic-segmentation heads on a plain ViT, the segmenter that joins them, and sliding-window inference.

Conventions:
- Feature maps are (B, C, h, w) with h = H / p, w = W / p for input (B, 3, H, W) and patch size p
  (``EvaViT.forward_intermediates(..., output_fmt='NCHW')``), i.e. stride p (16 or 14).
- Logits are (B, K, H, W) for K classes, at the input resolution; the label value 255 means "ignore"
  (handled by the loss and the metrics, not here).

Heads:
- ``LinearHead``: BatchNorm + 1x1 conv on one block's map (a linear classifier per patch).
- ``UperNetHead``: BEiT's ``SimpleFeaturePyramid`` (``evamim.models.pyramid``, shared with detection) turns
  four block outputs (all at stride p) into maps at strides p/4, p/2, p and 2p (4, 8, 16, 32 for p = 16), then
  UPerNet's pyramid pooling module (PPM) on the coarsest map and FPN fusion of all four; logits come out at
  stride p/4.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evamim import atomic
from evamim.models.pyramid import SimpleFeaturePyramid
from evamim.models.vit import EvaViT, EvaViTConfig, feature_take_indices

HEAD_KINDS = ("linear", "upernet")


# --------------------------------------------------------------------------------------------- building blocks
class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU, the unit of mmseg's UPerNet."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PyramidPooling(nn.Module):
    """UPerNet's PPM: average-pool to each scale, 1x1 ConvBNReLU, upsample back, concatenate with the input.

    (B, C, h, w) -> (B, C + len(pool_scales) * channels, h, w).
    """

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, channels)) for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


# ------------------------------------------------------------------------------------------------------ heads
class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv on one map: [(B, C, h, w)] -> logits (B, K, h, w)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != 1:
            raise ValueError(f"LinearHead takes one feature map, got {len(features)}")
        return self.classifier(self.norm(features[0]))


class UperNetHead(nn.Module):
    """Simple feature pyramid + UPerNet (PPM on the coarsest level, FPN top-down fusion, fused 3x3 conv).

    features: 4 (or 1) maps (B, in_channels, h, w) at stride p -> logits (B, K, 4h, 4w) at stride p/4.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(in_channels)
        levels = len(self.pyramid.levels)
        self.ppm = PyramidPooling(in_channels, channels, pool_scales)
        self.ppm_bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, kernel_size=3)
        self.lateral = nn.ModuleList(ConvBNReLU(in_channels, channels) for _ in range(levels - 1))
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, kernel_size=3) for _ in range(levels - 1))
        self.fuse = ConvBNReLU(levels * channels, channels, kernel_size=3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = self.pyramid(features)
        merged = [lateral(x) for lateral, x in zip(self.lateral, levels[:-1])]
        merged.append(self.ppm_bottleneck(self.ppm(levels[-1])))
        for i in range(len(merged) - 1, 0, -1):  # top-down: coarse maps refine the finer ones
            merged[i - 1] = merged[i - 1] + _resize(merged[i], merged[i - 1].shape[-2:])
        outputs = [fpn(x) for fpn, x in zip(self.fpn, merged[:-1])] + [merged[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(x, size) for x in outputs], dim=1))
        return self.classifier(self.dropout(fused))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------- segmenter
def default_indices(kind: str, depth: int) -> list[int]:
    """Blocks feeding a head: the last one (linear), or the ends of the four quarters of the depth (UPerNet;
    depth 12 -> [2, 5, 8, 11], depth 40 -> [9, 19, 29, 39], as ViT-Adapter's interaction blocks)."""
    if kind == "linear":
        return [depth - 1]
    return [max(depth * (i + 1) // 4 - 1, 0) for i in range(4)]


class Segmenter(nn.Module):
    """An EvaViT backbone + a segmentation head: images (B, 3, H, W) -> logits (B, K, H, W).

    The head reads the outputs of the blocks ``indices`` (before the final norm) and its logits are
    upsampled bilinearly to the input size. The backbone's final norm and classification head are
    replaced by identities and blocks after the deepest index are dropped: none of them would get a
    gradient. ``layer_id`` / ``num_layers`` / ``no_weight_decay`` expose the backbone's layers to the
    optimizer (layer-wise lr decay), with every head parameter in the last layer (full learning rate).
    """

    def __init__(
        self,
        backbone: EvaViT,
        num_classes: int,
        kind: str = "upernet",
        indices: Sequence[int] | None = None,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        depth = len(backbone.blocks)
        indices = default_indices(kind, depth) if indices is None else list(indices)
        indices = feature_take_indices(depth, indices)  # resolves negative indices, checks the range
        if kind == "linear" and len(indices) != 1:
            raise ValueError(f"the linear head reads one block, got indices {indices}")
        if kind == "upernet" and len(indices) not in (1, 4):
            raise ValueError(f"the UPerNet head reads 1 or 4 blocks, got indices {indices}")
        backbone.blocks = backbone.blocks[: max(indices) + 1]
        backbone.norm = nn.Identity()
        backbone.fc_norm = nn.Identity()
        backbone.head = nn.Identity()
        backbone.lm_head = None
        self.backbone = backbone
        self.kind = kind
        self.indices = indices
        self.num_classes = num_classes
        self.head_options = {"channels": channels, "pool_scales": list(pool_scales), "dropout": dropout}
        dim = backbone.embed_dim
        if kind == "linear":
            self.head = LinearHead(dim, num_classes)
        else:
            self.head = UperNetHead(dim, num_classes, channels=channels, pool_scales=pool_scales, dropout=dropout)

    @property
    def window(self) -> tuple[int, int]:
        """The input size the backbone is built for (the training crop and the sliding window)."""
        return tuple(self.backbone.config.img_size)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The head's inputs: one (B, C, h, w) map per entry of ``indices``, in that order."""
        unique = sorted(set(self.indices))
        maps = self.backbone.forward_intermediates(images, unique, output_fmt="NCHW", intermediates_only=True)
        by_index = dict(zip(unique, maps))
        return [by_index[i] for i in self.indices]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------------------- optimizer hooks
    def num_layers(self) -> int:
        return self.backbone.num_layers()

    def layer_id(self, name: str) -> int:
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.num_layers() + 1

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    # ----------------------------------------------------------------------------------- saving
    def describe(self) -> dict:
        """Everything besides the weights needed to rebuild this segmenter (``save_segmenter``)."""
        return {
            "backbone": self.backbone.config.to_dict(),
            "num_classes": self.num_classes,
            "kind": self.kind,
            "indices": self.indices,
            **self.head_options,
        }


SEGMENTER_WEIGHTS = "segmenter.safetensors"
SEGMENTER_CONFIG = "segmenter.json"


def save_segmenter(model: Segmenter, directory: str | os.PathLike) -> Path:
    """``directory/segmenter.safetensors`` + ``segmenter.json`` (backbone config, head kind and options)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / SEGMENTER_WEIGHTS))
    atomic.write_json(directory / SEGMENTER_CONFIG, model.describe())
    return directory


def load_segmenter(directory: str | os.PathLike) -> Segmenter:
    """Rebuild a segmenter written by ``save_segmenter`` and load its weights (strictly)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / SEGMENTER_CONFIG).exists():
        raise FileNotFoundError(f"{directory} has no {SEGMENTER_CONFIG}: not a directory written by save_segmenter")
    description = json.loads((directory / SEGMENTER_CONFIG).read_text())
    backbone = EvaViT(EvaViTConfig.from_dict(description.pop("backbone")))
    model = Segmenter(backbone, **description)
    model.load_state_dict(load_file(str(directory / SEGMENTER_WEIGHTS)))
    return model


# ------------------------------------------------------------------------------------------ sliding windows
def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride`` pixels, the last one flush with the far edge
    (mmseg's ``slide_inference``); a single window at 0 when ``size <= window``."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


@torch.no_grad()
def slide_inference(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    num_classes: int,
    window: int | Sequence[int],
    stride: int | Sequence[int],
    windows_per_batch: int = 8,
) -> torch.Tensor:
    """Logits of images of any size from a model that takes fixed-size windows.

    images (B, 3, H, W) -> logits (B, K, H, W): windows of size ``window`` every ``stride`` pixels (the
    last window of a row/column flush with the edge), each run through ``forward`` ((N, 3, wh, ww) ->
    (N, K, wh, ww)), their logits summed into place and divided by the number of windows covering each
    pixel. An image smaller than the window is padded with zeros at the bottom/right (zero = the mean
    colour for normalised inputs) and the padding cropped from the logits. Each ``forward`` call takes the
    crops of up to ``windows_per_batch // B`` window positions (at least one position, i.e. B crops).
    """
    (wh, ww), (sh, sw) = _pair(window), _pair(stride)
    if sh < 1 or sw < 1 or sh > wh or sw > ww:
        raise ValueError(f"stride {stride} must be in [1, window {window}] so that windows cover the image")
    batch, _, height, width = images.shape
    padded_h, padded_w = max(height, wh), max(width, ww)
    if (padded_h, padded_w) != (height, width):
        images = F.pad(images, (0, padded_w - width, 0, padded_h - height))
    boxes = [(y, x) for y in window_starts(padded_h, wh, sh) for x in window_starts(padded_w, ww, sw)]
    logits = images.new_zeros((batch, num_classes, padded_h, padded_w), dtype=torch.float32)
    counts = images.new_zeros((1, 1, padded_h, padded_w), dtype=torch.float32)
    per_call = max(1, windows_per_batch // batch)  # windows per forward call, each holding B crops
    for start in range(0, len(boxes), per_call):
        chunk = boxes[start : start + per_call]
        crops = torch.cat([images[:, :, y : y + wh, x : x + ww] for y, x in chunk])
        out = forward(crops).float()
        if out.shape[1:] != (num_classes, wh, ww):
            raise ValueError(f"forward returned {tuple(out.shape)} for windows {tuple(crops.shape)}; expected "
                             f"(N, {num_classes}, {wh}, {ww})")
        for j, (y, x) in enumerate(chunk):
            logits[:, :, y : y + wh, x : x + ww] += out[j * batch : (j + 1) * batch]
            counts[:, :, y : y + wh, x : x + ww] += 1
    return (logits / counts)[:, :, :height, :width]


__all__ = [
    "HEAD_KINDS",
    "LinearHead",
    "PyramidPooling",
    "Segmenter",
    "SimpleFeaturePyramid",
    "UperNetHead",
    "default_indices",
    "load_segmenter",
    "save_segmenter",
    "slide_inference",
    "window_starts",
]
