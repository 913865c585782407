"""An exponential moving average (EMA) of a model's weights, kept as a training-loop hook.

After every optimizer step that was taken (not one skipped for a non-finite loss) each floating-point
parameter of the EMA copy moves towards the trained one::

    ema = decay * ema + (1 - decay) * param

Buffers (e.g. BatchNorm running statistics) are copied as they are, not averaged. The copy lives on
the model's device, always in eval mode and without gradients, so it can be evaluated next to the
model. Its state (weights, update count, the step of the last update) is saved in and restored from
the loop's checkpoints through the hook ``state_dict`` protocol.

The horizon of an EMA is about ``1 / (1 - decay)`` updates: 0.9999 (EVA's fine-tuning, timm's
default) averages over ~10 000 steps, so it only makes sense for runs well longer than that; use a
smaller decay for short runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from evamim.engine.loop import Hook
from evamim.engine.loop.parallel import full_tensor
from evamim.engine.modules import unwrap_model


@dataclass
class EmaConfig:
    """Whether and how to keep an EMA of the weights."""

    enabled: bool = False
    """Keep an EMA copy of the model, update it after every optimizer step and evaluate it too."""
    decay: float = 0.9999
    """Weight of the old average at each update, in (0, 1); horizon ~1 / (1 - decay) steps."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")


class ModelEma(Hook):
    """EMA of ``model``'s weights (the unwrapped module under DDP / ``torch.compile``).

    ``ema.module`` is a deep copy of the model, in eval mode, with ``requires_grad=False``.

    Updated in ``on_step_end`` after every optimizer step that was taken; the loop runs the hooks before
    its evaluation, so an evaluation at step ``s`` sees the EMA including step ``s``. An update is applied at
    most once per step.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.num_updates = 0
        self.step = 0
        """The trainer step whose weights the EMA includes last (0 = none yet)."""

    # ------------------------------------------------------------------------------------- updates
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights; buffers are copied."""
        source = unwrap_model(model)
        ema_params, params = [], []
        for (name, ema_param), (source_name, param) in zip(self.module.named_parameters(), source.named_parameters()):
            if name != source_name:
                raise RuntimeError(f"EMA parameter {name!r} does not line up with the model's {source_name!r}")
            if ema_param.dtype.is_floating_point:
                ema_params.append(ema_param)
                # An FSDP-sharded parameter is gathered whole (a collective: every process updates its EMA in
                # the same order); the EMA copy is a plain module, whole on every process.
                params.append(full_tensor(param.detach()).to(ema_param.dtype))
            else:
                ema_param.copy_(param)
        if ema_params:
            # One fused multi-tensor kernel instead of a launch per tensor (hundreds for a ViT-g).
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def _update_for_step(self, trainer) -> None:
        if trainer.step != self.step:
            self.update(trainer.model)
            self.step = trainer.step

    # --------------------------------------------------------------------------------- hook protocol
    def on_step_end(self, trainer, metrics: Mapping[str, Any], skipped: bool) -> None:
        if not skipped:
            self._update_for_step(trainer)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "step": self.step,
            "weights": self.module.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
        self.step = int(state["step"])
        # The configured decay wins over the saved one: changing it on resume is a legitimate choice.


__all__ = ["EmaConfig", "ModelEma"]
