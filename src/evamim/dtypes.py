"""The one table of floating-point precisions, by the names configs and flags use (``fp32``, ``bf16``, ``fp16``)."""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Config name -> torch dtype."""

LONG_NAMES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""torch's names, accepted where a dtype is given as a string."""


def dtype_of(name: str, key: str = "precision") -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` (or torch's long names) -> the torch dtype; anything else is a ValueError
    naming ``key`` and the valid values."""
    short = LONG_NAMES.get(name.lower(), name.lower()) if isinstance(name, str) else None
    if short not in PRECISIONS:
        raise ValueError(f"{key} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[short]


def name_of(dtype: torch.dtype) -> str:
    """torch dtype -> its config name (``torch.bfloat16`` -> ``bf16``)."""
    for short, value in PRECISIONS.items():
        if value == dtype:
            return short
    raise ValueError(f"{dtype} is not one of the precisions {', '.join(PRECISIONS)}")
