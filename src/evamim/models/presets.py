"""Named model sizes. One dict, no registry: add a size by adding an entry."""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Sequence

from evamim.models.checkpoint import TASK_HEADS
from evamim.models.vit import EvaViT, EvaViTConfig

_EVA02 = dict(patch_size=14, mlp_ratio=4 * 2 / 3, swiglu=True, use_rope=True, rope_ref_grid=(16, 16), init_std=0.02)

PRESETS: dict[str, dict[str, Any]] = {
    # EVA-01 style: plain ViT, learned absolute positions, GELU MLP.
    "eva_tiny_p16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "eva_small_p16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "eva_base_p16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "eva_large_p14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "eva_large_p16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    # EVA-g/14: 1408 wide, 40 deep, 16 heads of 88, MLP 6144 (REFERENCE section 2).
    "eva_giant_p14": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408),
    "eva_giant_p16": dict(patch_size=16, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408),
    # EVA-02: RoPE, SwiGLU (hidden int(8/3 * C)), sub-LN in the MLP for B and L.
    "eva02_tiny_p14": dict(_EVA02, embed_dim=192, depth=12, num_heads=3),
    "eva02_small_p14": dict(_EVA02, embed_dim=384, depth=12, num_heads=6),
    "eva02_base_p14": dict(_EVA02, embed_dim=768, depth=12, num_heads=12, sub_ln_mlp=True),
    "eva02_large_p14": dict(_EVA02, embed_dim=1024, depth=24, num_heads=16, sub_ln_mlp=True),
}


def list_models(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style pattern, e.g. ``list_models('eva02_*')``."""
    return sorted(name for name in PRESETS if fnmatch.fnmatch(name, pattern))


def model_config(name: str, **overrides: Any) -> EvaViTConfig:
    """The EvaViTConfig of a preset with overrides applied (unknown keys are an error listing the valid ones)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return EvaViTConfig.from_dict({**PRESETS[name], **overrides})


def create_model(
    name: str | None = None,
    pretrained: str | os.PathLike | dict | None = None,
    *,
    device: Any = None,
    strict: bool = True,
    task_heads: Sequence[str] = TASK_HEADS,
    prefer_ema: bool = False,
    **overrides: Any,
) -> EvaViT:
    """Build an EvaViT from a preset name, optionally loading weights.

    - ``create_model("eva_base_p16")``: random init (EVA init).
    - ``create_model("eva_base_p16", pretrained=path)``: any supported format (official EVA .pt, timm,
      open_clip, evamim directory or .safetensors); pos_embed / patch kernels are resampled when the sizes differ.
    - ``create_model(pretrained=evamim_dir)``: the architecture comes from the directory's config.json;
      ``overrides`` still apply (e.g. ``num_classes=1000``, ``img_size=336``).
    Loading is strict (see ``evamim.load_weights``): every backbone tensor must match the file, only the
    ``task_heads`` (classifier ``head``, MIM ``lm_head``, ``mask_token``) may be new or dropped, and the log
    says which. ``strict=False`` loads what matches and logs one warning line about the rest.
    ``device="meta"`` builds without allocating memory (parameter counting, FLOPs).
    """
    from evamim.models import checkpoint

    if name is None:
        if pretrained is None:
            raise ValueError("give a model name (see evamim.list_models()) or pretrained=<evamim model directory>")
        config = checkpoint.read_config(pretrained)
        config = EvaViTConfig.from_dict({**config.to_dict(), **overrides})
    else:
        config = model_config(name, **overrides)
    if device is not None:
        with __import__("torch").device(device):
            model = EvaViT(config)
    else:
        model = EvaViT(config)
    if pretrained is not None:
        report = checkpoint.load_weights(model, pretrained, strict=strict, task_heads=task_heads,
                                         prefer_ema=prefer_ema)
        report.log()
    return model
