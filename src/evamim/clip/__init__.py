"""EVA-CLIP: an EvaViT vision tower with open_clip's text tower, trained contrastively.

Names resolve lazily (like ``evamim``'s own), so importing one module of this package does not import the
others, nor open_clip.
"""

from evamim._lazy import lazy_attributes

_LAZY = {
    "ClipConfig": "evamim.clip.config",
    "MAX_LOGIT_SCALE": "evamim.clip.config",
    "EvaClip": "evamim.clip.model",
    "save_clip": "evamim.clip.checkpoint",
    "load_clip": "evamim.clip.checkpoint",
    "read_clip_config": "evamim.clip.checkpoint",
    "is_clip_directory": "evamim.clip.checkpoint",
    "load_vision": "evamim.clip.checkpoint",
    "load_clip_weights": "evamim.clip.checkpoint",
    "OFFICIAL_MODEL_CONFIGS": "evamim.clip.official",
    "official_clip_config": "evamim.clip.official",
    "load_eva_clip_weights": "evamim.clip.official",
    "open_clip_config": "evamim.clip.interop",
    "register_timm_trunk": "evamim.clip.interop",
    "create_open_clip_model": "evamim.clip.interop",
    "to_open_clip_state_dict": "evamim.clip.interop",
    "from_open_clip_state_dict": "evamim.clip.interop",
    "load_open_clip": "evamim.clip.interop",
    "load_open_clip_text": "evamim.clip.interop",
    "save_open_clip": "evamim.clip.interop",
    "contrastive_loss": "evamim.clip.loss",
    "gather_with_grad": "evamim.clip.loss",
    "ZeroShotEvaluation": "evamim.clip.zeroshot",
    "classifier_weights": "evamim.clip.zeroshot",
    "evaluate_zero_shot": "evamim.clip.zeroshot",
    "retrieval_recall": "evamim.clip.retrieval",
    "OPENAI_IMAGENET_TEMPLATES": "evamim.clip.templates",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes("evamim.clip", _LAZY, globals())
