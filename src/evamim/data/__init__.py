"""Data: sources (folders, lists, WebDataset shards, synthetic shapes), transforms, resumable loaders.

Names resolve lazily, so ``from evamim.data.config import DataConfig`` stays light (no torchvision).
"""

from evamim._lazy import lazy_attributes

_LAZY = {
    "DataConfig": "evamim.data.config",
    "CLIP_MEAN": "evamim.data.config",
    "CLIP_STD": "evamim.data.config",
    "build_loader": "evamim.data.loader",
    "Loader": "evamim.data.loader",
    "build_dataset": "evamim.data.sources",
    "build_transform": "evamim.data.transforms",
    "PretrainTransform": "evamim.data.transforms",
    "FinetuneTransform": "evamim.data.transforms",
    "EvalTransform": "evamim.data.transforms",
    "renormalize": "evamim.data.transforms",
    "denormalize": "evamim.data.transforms",
    "Collator": "evamim.data.collate",
    "ResumableDistributedSampler": "evamim.data.sampler",
    "SyntheticShapes": "evamim.data.synthetic",
    "SyntheticScenes": "evamim.data.scenes",
    "BatchMixup": "evamim.data.mixup",
    "build_mixup": "evamim.data.mixup",
    "BadSample": "evamim.data.decode",
    "TooManyBadSamples": "evamim.data.failures",
    "make_shards": "evamim.data.shard_writer",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes('evamim.data', _LAZY, globals())
