"""The pre-training step and validation as the task runner sees them (``evamim.tasks.runner``)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from evamim.data.image_ops import normalize_on_device


class PretrainStep:
    """The objective as the loop sees it: ``(model, batch) -> dict``, teacher targets computed inside.

    ``model`` is the ``ObjectiveModule`` (student + objective), possibly wrapped by DDP or sharded by FSDP:
    calling it runs the objective through the wrapper, so gradients are synchronised. The teacher is
    called under the loop's autocast but outside autograd; it is never wrapped.

    Images: the batch's tensors are moved to ``device`` (``non_blocking``: asynchronous from pinned
    memory), then uint8 ``images`` (the pre-training loader's ``output="uint8"``) are normalised there
    with ``mean``/``std`` (the data config's: what the student, the teacher's ``renormalize`` and
    pixel_mim's un-normalisation expect); float images are taken as normalised and pass unchanged.

    ``prepare`` (optional) runs on the batch while it is still on the CPU: what it derives from the batch
    (clip_mae's ``visible``/``masked`` indices) costs no device sync there.
    """

    def __init__(self, teacher: nn.Module | None, device: torch.device, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 prepare: Callable[[dict], dict] | None = None):
        if (mean is None) != (std is None):
            raise ValueError("PretrainStep: pass mean and std together (the data config's), or neither")
        self.teacher = teacher
        self.device = device
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.prepare = prepare

    def __call__(self, model: nn.Module, batch: dict) -> dict:
        if self.prepare is not None:
            batch = self.prepare(batch)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        images = batch["images"]
        if not images.is_floating_point():
            if self.mean is None:
                raise TypeError(f"PretrainStep got {images.dtype} images but no mean/std to normalise them with: "
                                "build it with PretrainStep(teacher, device, mean=data.mean, std=data.std)")
            batch["images"] = normalize_on_device(images, self.mean, self.std)
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
        # uint8 pixels, normalised on the device by the step, like the training batches (when it has mean/std).
        output = "uint8" if step.mean is not None else "float"
        if output == "uint8" and (tuple(map(float, data.mean)), tuple(map(float, data.std))) != (step.mean, step.std):
            raise ValueError(f"validation data mean/std {tuple(data.mean)}/{tuple(data.std)} differ from the step's "
                             f"{step.mean}/{step.std}, which normalises the validation images: give both the same")
        loader = build_loader(data, batch_size=batch_size, purpose="eval", mask_generator=masks, output=output)
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
