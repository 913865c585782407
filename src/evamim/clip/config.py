"""ClipConfig: everything needed to rebuild an :class:`~evamim.clip.model.EvaClip`, saved as config.json.

Kept free of open_clip so that a saved CLIP directory can be inspected (its width, its depth) without importing
it; the text fields are checked against open_clip's ``CLIPTextCfg`` when the text tower is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evamim.models.vit_config import EvaViTConfig, config_from_dict

POOLS = ("token", "avg")
# open_clip's ViT-B text tower (ViT-B-16, EVA02-B-16): what open_clip builds when text_cfg is left empty.
DEFAULT_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
# open_clip's text towers built from a Hugging Face model download their weights and tokenizer when built.
HF_TEXT_KEYS = ("hf_model_name", "hf_tokenizer_name")
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)
"""open_clip clamps ``logit_scale`` (the log of the temperature's inverse) to [0, ln 100] after every optimizer
step; the trainer does the same, the model does not."""


def _vision_config(vision: EvaViTConfig | dict | str) -> EvaViTConfig:
    if isinstance(vision, EvaViTConfig):
        return vision
    if isinstance(vision, str):
        from evamim.models.presets import model_config

        return model_config(vision)
    if isinstance(vision, dict):
        return EvaViTConfig.from_dict(vision)
    raise ValueError(f"ClipConfig.vision must be an evamim preset name, an EvaViTConfig or its dict, "
                     f"got {type(vision).__name__}")


@dataclass
class ClipConfig:
    """An EVA-CLIP: an EvaViT vision tower with its CLIP projection, open_clip's text tower, a logit scale.

    ``vision`` is the EXACT config of ``visual.trunk``: a preset name or EvaViTConfig dict is accepted and its
    head fields are set to what a CLIP tower is -- ``global_pool = pool``, ``num_classes = embed_dim`` (the
    trunk's ``head`` is the projection, as in open_clip's EVA towers), no MIM head, no mask token -- so that
    ``EvaViT(config.vision)`` rebuilds the trunk and the saved config.json says what was built.
    ``text`` holds open_clip ``text_cfg`` fields (``CLIPTextCfg``); missing main fields take open_clip's
    ViT-B text tower (``DEFAULT_TEXT``).
    """

    vision: Any = "eva_base_p16"
    """An evamim preset name, an EvaViTConfig or its dict (see the class docstring)."""
    pool: str = "token"
    """'token' (cls token after the final norm: open_clip's EVA towers, ``timm_pool='token'``) or 'avg'
    (mean of the patch tokens, then fc_norm)."""
    embed_dim: int = 512
    """Width of the joint image-text embedding."""
    text: dict = field(default_factory=lambda: dict(DEFAULT_TEXT))
    """open_clip ``text_cfg`` fields (context_length, vocab_size, width, heads, layers, mlp_ratio, ...)."""
    quick_gelu: bool = False
    """QuickGELU in the text tower (OpenAI-trained text weights need it); the vision trunk always uses GELU,
    as open_clip's timm towers do."""
    init_logit_scale: float = INIT_LOGIT_SCALE
    """Initial ``logit_scale`` = log(1 / temperature); open_clip's default is log(1 / 0.07)."""

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"ClipConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"ClipConfig.embed_dim must be a positive int, got {self.embed_dim!r}")
        vision = _vision_config(self.vision)
        # The trunk's head fields follow from the CLIP settings (see the class docstring); one source of truth.
        self.vision = EvaViTConfig.from_dict({**vision.to_dict(), "global_pool": self.pool,
                                              "num_classes": self.embed_dim, "mim_head_dim": None,
                                              "use_mask_token": False})
        if not isinstance(self.text, dict):
            raise ValueError(f"ClipConfig.text must be a dict of open_clip text_cfg fields, got {self.text!r}")
        self.text = {**DEFAULT_TEXT, **self.text}
        self._check_text()

    def _check_text(self) -> None:
        text = self.text
        hf = [key for key in HF_TEXT_KEYS if text.get(key)]
        if hf:
            raise ValueError(f"ClipConfig.text sets {hf}: Hugging Face text towers are not supported (they are "
                             f"downloaded when built); use open_clip's own text transformer fields")
        for key in ("context_length", "vocab_size", "width", "heads", "layers"):
            value = text[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClipConfig.text[{key!r}] must be a positive int, got {value!r}")
        if text["width"] % text["heads"]:
            raise ValueError(f"ClipConfig.text: width {text['width']} is not divisible by heads {text['heads']}")

    @property
    def depth(self) -> int:
        """Blocks of the vision trunk (what ``layer=`` of a teacher indexes)."""
        return self.vision.depth

    def to_dict(self) -> dict:
        return {"vision": self.vision.to_dict(), "pool": self.pool, "embed_dim": self.embed_dim,
                "text": dict(self.text), "quick_gelu": self.quick_gelu, "init_logit_scale": self.init_logit_scale}

    @classmethod
    def from_dict(cls, values: dict) -> "ClipConfig":
        return config_from_dict(cls, values)
