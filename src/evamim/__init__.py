"""evamim: EVA-style masked image modeling against a frozen CLIP teacher.

The public API. Names resolve lazily so that ``import evamim`` stays light (no timm, open_clip or
transformers import until a teacher or a conversion needs them).
"""

from evamim import _compat
from evamim._lazy import lazy_attributes

# Must run before anything imports torchvision (timm, open_clip and transformers all do).
_compat.ensure_torchvision_importable()

__version__ = "0.1.0"

_LAZY = {
    "EvaViT": "evamim.models.vit",
    "EvaViTConfig": "evamim.models.vit",
    "create_model": "evamim.models.presets",
    "list_models": "evamim.models.presets",
    "load_weights": "evamim.models.checkpoint",
    "save_pretrained": "evamim.models.checkpoint",
    "to_timm_state_dict": "evamim.models.checkpoint",
    "create_teacher": "evamim.teachers",
    "BlockMasking": "evamim.pretrain.masking",
    "RandomMasking": "evamim.pretrain.masking",
    "EvaClip": "evamim.clip.model",
    "ClipConfig": "evamim.clip.config",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_attributes('evamim', _LAZY, globals())
