"""Features of a frozen backbone for the evaluation tasks (kNN, linear probe, embed).

- :mod:`~evamim.features.choices`: the feature choices (``cls``, ``avg``, ``lastN``, ``last4+avg``, ...)
  and the one forward that computes them.
- :mod:`~evamim.features.extract`: ``FeatureSet`` and extraction over a loader, on one process or many.
- :mod:`~evamim.features.cache`: the fingerprinted feature cache.
- :mod:`~evamim.features.val_data`: the validation set of a task (``val_data.*``).
- :mod:`~evamim.features.pipeline`: from a task's config to training and validation features.

Names resolve lazily: importing the package imports none of these modules (nor the data pipeline) until
a name is used.
"""

from evamim._lazy import lazy_attributes

_LAZY = {
    **dict.fromkeys(
        ("FEATURE_CHOICES_HELP", "FeatureRequest", "blocks_of", "check_features", "compute_parts", "feature_dim",
         "final_layer_norm", "parse_feature"),
        "evamim.features.choices",
    ),
    **dict.fromkeys(
        ("PRECISIONS", "FeatureSet", "extract_features", "features_from_batches", "holdout_split", "resolve_precision"),
        "evamim.features.extract",
    ),
    **dict.fromkeys(
        ("CACHE_FORMAT", "cache_paths", "dataset_identity", "feature_fingerprint", "load_cache", "save_cache",
         "weights_digest"),
        "evamim.features.cache",
    ),
    **dict.fromkeys(
        ("ValDataSection", "check_same_classes", "class_problems", "val_data_config"),
        "evamim.features.val_data",
    ),
    **dict.fromkeys(
        ("check_model_and_data", "features_for", "prepare_backbone", "resolve_cache_dir", "train_val_features"),
        "evamim.features.pipeline",
    ),
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes("evamim.features", _LAZY, globals())
