"""Mixed precision: fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling.

The master weights and optimizer state stay fp32 in every mode; autocast only changes the dtype
that matmuls and convolutions run in.

- ``bf16``: same exponent range as fp32, so no loss scaling; the better choice on any hardware
  that has it (Ampere+ GPUs, recent CPUs).
- ``fp16``: 5 exponent bits, so small gradients underflow unless the loss is multiplied by a large
  scale before backward. ``torch.amp.GradScaler`` grows the scale x2 after ``growth_interval`` clean
  steps and halves it (skipping that step) on overflow: EVA's settings are initial scale 2**16 and a
  500-step window. EVA's "hysteresis 2" (tolerate one overflow before backing off) is a DeepSpeed
  loss-scaler option that GradScaler does not have; here every overflow halves the scale.
- ``fp32``: no autocast.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from evamim.dtypes import dtype_of

_log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")

FP16_INIT_SCALE = 2.0**16
FP16_GROWTH_INTERVAL = 500


class Precision:
    """Autocast context, backward, unscale, optimizer step and scaler update for one precision mode.

    ``device_type`` is ``"cuda"`` or ``"cpu"`` (take it from the model's parameters).
    """

    def __init__(self, kind: str, device_type: str):
        if kind not in PRECISIONS:
            raise ValueError(f"unknown precision {kind!r}; choose one of {', '.join(PRECISIONS)}")
        self.kind = kind
        self.device_type = device_type
        self.dtype = dtype_of(kind)
        self.scaler = (
            torch.amp.GradScaler(device_type, init_scale=FP16_INIT_SCALE, growth_interval=FP16_GROWTH_INTERVAL)
            if kind == "fp16"
            else None
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass and the loss."""
        if self.kind == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (multiplied by the loss scale in fp16)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place (fp16), so clipping sees true norms."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step. Call :meth:`unscale_` first; the caller has already checked the grads are finite."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        """End of an optimizer step, taken or skipped: the fp16 scaler halves its scale if this step's
        gradients overflowed, and grows it after ``growth_interval`` clean steps."""
        if self.scaler is not None:
            self.scaler.update()

    @property
    def loss_scale(self) -> float | None:
        """Current fp16 loss scale, ``None`` in the other modes."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the loss-scaler state. Switching precision on resume is allowed (fp16 -> bf16 is the
        usual cure for overflows) and logged: the saved scale is dropped, or a fresh scaler starts at 2**16."""
        if state is not None and self.scaler is None:
            _log.warning("checkpoint has an fp16 loss-scaler state; this run uses %s, so it is not used", self.kind)
        elif state is None and self.scaler is not None:
            _log.warning("checkpoint has no fp16 loss-scaler state; the scaler starts fresh at %g", FP16_INIT_SCALE)
        elif self.scaler is not None:
            self.scaler.load_state_dict(state)
