"""Small helpers about the model object the engine is handed (possibly wrapped)."""

from __future__ import annotations

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Parameter names, ``no_weight_decay()``/``layer_id()`` hooks and checkpoint keys all refer to the
    unwrapped module, so that a checkpoint loads the same with or without wrapping.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a module with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
