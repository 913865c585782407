"""The pre-training step and validation as the task runner sees them (``evamim.tasks.runner``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


class PretrainStep:
    """The objective as the loop sees it: ``(model, batch) -> dict``, teacher targets computed inside.

    ``model`` is the ``ObjectiveModule`` (student + objective), possibly wrapped by DDP or sharded by FSDP:
    calling it runs the objective through the wrapper, so gradients are synchronised. The teacher is
    called under the loop's autocast but outside autograd; it is never wrapped.
    """

    def __init__(self, teacher: nn.Module | None, device: torch.device):
        self.teacher = teacher
        self.device = device

    def __call__(self, model: nn.Module, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        targets = self.teacher(batch["images"]) if self.teacher is not None else None
        return model(batch, targets)


class MaskedValidation:
    """EVA's validation loss (an :class:`~evamim.tasks.runner.Evaluation`): the objective on held-out images
    with a fixed mask that hides every other patch, each of the objective's ``eval_metrics`` averaged over
    every token it covers (``eval_weight``, e.g. the masked patches) of the whole set, so the numbers depend on
    neither the batch size nor the number of processes."""

    def __init__(self, loader, spec: Any, step: PretrainStep, max_batches: int | None = None):
        self.loader = loader
        self.spec = spec
        self.step = step
        self.max_batches = max_batches

    @classmethod
    def build(cls, data: Any, spec: Any, grid: tuple[int, int], step: PretrainStep, *, batch_size: int,
              max_batches: int | None) -> "MaskedValidation":
        from evamim.data.loader import build_loader
        from evamim.pretrain.masking import AlternatingMasking

        masks = AlternatingMasking(grid) if spec.uses_masks else None
        loader = build_loader(data, batch_size=batch_size, purpose="eval", mask_generator=masks)
        return cls(loader, spec, step, max_batches)

    def score(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        output = self.step(model, batch)
        if self.spec.eval_weight is not None:
            weight = output[self.spec.eval_weight].detach().double()
        else:
            weight = torch.tensor(float(len(batch["images"])), dtype=torch.float64)
        sums = {name: output[name].detach().double().cpu() * weight.cpu() for name in self.spec.eval_metrics}
        return {**sums, "weight": weight.cpu()}

    def finalize(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
        if "weight" not in sums or float(sums["weight"]) == 0:
            raise ValueError("validation: no batch was scored; check val_data.path and eval.max_batches")
        return {name: float(sums[name] / sums["weight"]) for name in self.spec.eval_metrics}
