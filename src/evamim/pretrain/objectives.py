"""Pre-training objectives: ``objective(student, batch, targets) -> dict[str, Tensor]``.

- ``student``: an EvaViT-like module (not a DDP wrapper: see ``ObjectiveModule``) with
  ``forward_features(images, mask=None) -> (B, 1 + N, C)``, ``num_prefix_tokens``, ``lm_head`` and
  ``patch_embed.patch_size``.
- ``batch``: ``{"images": (B, 3, H, W) normalised float, "masks": (B, N) bool, True = masked}``; ``masks``
  only for the masked objectives.
- ``targets``: the teacher's (B, N, D) patch features, or None for objectives without a teacher.

Every objective returns ``loss`` (a scalar float32 tensor, fp32 even under autocast) and named, detached
metrics. Masked objectives gather the masked tokens of the whole batch with the boolean mask: the number
of masked patches varies from image to image (block masking) and is never assumed fixed. A batch without
any masked patch gives a NaN loss, which the training loop's non-finite guard reports.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evamim.teachers.base import CLIP_MEAN, CLIP_STD


def _fp32(device: torch.device):
    """A region where autocast is off, so that losses are computed and returned in float32."""
    return torch.autocast(device.type, enabled=False)


def _patch_tokens(student: nn.Module, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """(B, 3, H, W), (B, N) bool or None -> patch tokens (B, N, C) (prefix tokens dropped)."""
    tokens = student.forward_features(images, mask=masks)
    return tokens[:, getattr(student, "num_prefix_tokens", 1) :]


def _masks(batch: dict) -> torch.Tensor:
    masks = batch["masks"]
    if masks.dtype != torch.bool:
        raise TypeError(f"batch['masks'] must be a bool tensor (True = masked), got {masks.dtype}")
    return masks


def _check_masks(masks: torch.Tensor, tokens: torch.Tensor) -> None:
    if tuple(masks.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"batch['masks'] has shape {tuple(masks.shape)} but the student has {tuple(tokens.shape[:2])} "
            f"(batch, patches): the masks were made for another patch grid"
        )


def _check_targets(targets: torch.Tensor | None, tokens: torch.Tensor, objective: str) -> torch.Tensor:
    if targets is None:
        raise ValueError(f"{objective} needs teacher targets (B, N, D), got None")
    if tuple(targets.shape[:2]) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"{objective}: targets have shape {tuple(targets.shape)} but the student has {tuple(tokens.shape[:2])} "
            f"(batch, patches): build the teacher with student_grid equal to the student's grid_size"
        )
    # Targets are constants of the loss, whatever autograd state they arrive with.
    return targets.detach()


def _check_head_width(prediction: torch.Tensor, width: int, objective: str, what: str) -> None:
    if prediction.shape[-1] != width:
        raise ValueError(
            f"{objective}: the student's lm_head outputs {prediction.shape[-1]} features but {what} has {width}; "
            f"build the student with mim_head_dim={width}"
        )


def _negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, D), (M, D) -> (loss = -mean cos, mean cos detached), both float32."""
    with _fp32(prediction.device):
        cosine = F.cosine_similarity(prediction.float(), target.float(), dim=-1)
        mean_cosine = cosine.mean()
    return -mean_cosine, mean_cosine.detach()


def clip_mim(student: nn.Module, batch: dict, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """EVA: predict the teacher's features at the masked patches from the visible ones.

    ``feats = student.forward_features(images, mask=masks)[:, 1:]`` (B, N, C);
    ``pred = student.lm_head(feats[masks])`` (M, D) with M = masks.sum() over the whole batch;
    ``loss = -mean cos(pred, targets[masks])`` over the M masked tokens.
    Metrics: ``cos_masked`` (mean cosine), ``num_masked`` (M, as float).
    """
    images, masks = batch["images"], _masks(batch)
    features = _patch_tokens(student, images, masks)
    _check_masks(masks, features)
    targets = _check_targets(targets, features, "clip_mim")
    prediction = student.lm_head(features[masks])
    _check_head_width(prediction, targets.shape[-1], "clip_mim", "the teacher")
    loss, cosine = _negative_cosine(prediction, targets[masks])
    return {"loss": loss, "cos_masked": cosine, "num_masked": masks.sum().float()}


def feature_distill(student: nn.Module, batch: dict, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Feature distillation (EVA's pilot study): no masking, every patch token regresses the teacher's.

    ``pred = student.lm_head(student.forward_features(images)[:, 1:])`` (B, N, D);
    ``loss = -mean cos(pred, targets)`` over all B*N tokens. Metric: ``cos`` (mean cosine).
    """
    features = _patch_tokens(student, batch["images"], None)
    targets = _check_targets(targets, features, "feature_distill")
    prediction = student.lm_head(features)
    _check_head_width(prediction, targets.shape[-1], "feature_distill", "the teacher")
    loss, cosine = _negative_cosine(prediction.flatten(0, 1), targets.flatten(0, 1))
    return {"loss": loss, "cos": cosine}


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major grid order, pixels ordered (row, col, channel)
    inside a patch (MAE's layout)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"images of {height}x{width} px are not divisible into {patch_size}-px patches")
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, h * w, patch_size * patch_size * channels)


def pixel_mim(
    student: nn.Module,
    batch: dict,
    targets: torch.Tensor | None = None,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Pixel regression at masked patches (MAE's target, with BEiT/EVA-style mask tokens). No teacher.

    The images are un-normalised with ``mean``/``std`` (the normalisation the data pipeline applied), cut
    into p x p patches (B, N, p*p*3), and with ``norm_pix`` each patch is normalised by its own mean and
    (unbiased) variance: ``(x - mean) / sqrt(var + eps)`` (MAE's norm_pix_loss).
    ``pred = student.lm_head(feats[masks])`` (M, p*p*3); ``loss = mean squared error`` over the masked
    patches. ``targets`` is ignored. Metrics: ``num_masked``.
    """
    images, masks = batch["images"], _masks(batch)
    features = _patch_tokens(student, images, masks)
    _check_masks(masks, features)
    patch_size = int(student.patch_embed.patch_size)
    prediction = student.lm_head(features[masks])
    with _fp32(images.device):
        mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        pixels = patchify(images.float() * std_t + mean_t, patch_size)
        if norm_pix:
            pixels = (pixels - pixels.mean(dim=-1, keepdim=True)) / (pixels.var(dim=-1, keepdim=True) + eps) ** 0.5
        target = pixels[masks]
        _check_head_width(prediction, target.shape[-1], "pixel_mim", f"a {patch_size}x{patch_size}x3 patch")
        loss = F.mse_loss(prediction.float(), target)
    return {"loss": loss, "num_masked": masks.sum().float()}


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the pre-training task needs to know about an objective; registered once with :func:`register_objective`.

    ``needs_teacher``: the step computes ``targets = teacher(batch['images'])`` (B, N, D).
    ``uses_masks``: batches carry ``masks`` (B, N) bool, True = masked; validation hides every other patch.
    ``uses_mask_token``: the student has a learned mask token (masked patches are replaced by it).
    ``head``: the width of the student's ``lm_head``: ``"teacher"`` (the teacher's feature width) or
    ``"pixels"`` (a p x p x 3 patch).
    ``eval_metrics``: the returned metrics that validation averages (``loss`` first), each a mean over tokens,
    weighted by ``eval_weight`` (a returned count such as ``num_masked``) or, when None, by the images.
    ``data_options``: ``DataConfig`` fields passed to the objective as options (pixel_mim: mean, std).
    """

    name: str
    fn: Callable[..., dict]
    description: str
    needs_teacher: bool
    uses_masks: bool
    uses_mask_token: bool
    head: str
    eval_metrics: tuple[str, ...]
    eval_weight: str | None = None
    data_options: tuple[str, ...] = ()

    def head_dim(self, teacher_dim: int | None, patch_size: int) -> int:
        """The width of the student's ``lm_head`` for this objective."""
        if self.head == "pixels":
            return patch_size * patch_size * 3
        if teacher_dim is None:
            raise ValueError(f"objective {self.name} predicts teacher features but no teacher width was given")
        return teacher_dim


@dataclass(frozen=True)
class Objective:
    """A registered objective with its options bound: ``objective(student, batch, targets) -> dict``."""

    spec: ObjectiveSpec
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher

    @property
    def uses_masks(self) -> bool:
        return self.spec.uses_masks

    def __call__(self, student: nn.Module, batch: dict, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.spec.fn(student, batch, targets, **self.options)


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, fn: Callable[..., dict], *, description: str, needs_teacher: bool,
                       uses_masks: bool, eval_metrics: Sequence[str], eval_weight: str | None = None,
                       uses_mask_token: bool | None = None, head: str = "teacher",
                       data_options: Sequence[str] = ()) -> ObjectiveSpec:
    """Make ``fn(student, batch, targets, **options) -> {"loss": ..., metrics}`` available as
    ``objective: NAME`` in ``evamim pretrain`` (see :class:`ObjectiveSpec` for the properties)."""
    if name in _OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    if head not in ("teacher", "pixels"):
        raise ValueError(f"head must be 'teacher' or 'pixels', got {head!r}")
    if not eval_metrics or eval_metrics[0] != "loss":
        raise ValueError(f"eval_metrics must start with 'loss', got {list(eval_metrics)}")
    spec = ObjectiveSpec(name, fn, description, needs_teacher, uses_masks,
                         uses_masks if uses_mask_token is None else uses_mask_token, head, tuple(eval_metrics),
                         eval_weight, tuple(data_options))
    _OBJECTIVES[name] = spec
    return spec


register_objective("clip_mim", clip_mim, description="EVA: teacher features at the masked patches, negative cosine",
                   needs_teacher=True, uses_masks=True, eval_metrics=("loss", "cos_masked"), eval_weight="num_masked")
register_objective("feature_distill", feature_distill,
                   description="feature distillation: every patch regresses the teacher's, no masking",
                   needs_teacher=True, uses_masks=False, eval_metrics=("loss", "cos"))
register_objective("pixel_mim", pixel_mim, description="MAE's normalised pixels at the masked patches, MSE",
                   needs_teacher=False, uses_masks=True, eval_metrics=("loss",), eval_weight="num_masked",
                   head="pixels", data_options=("mean", "std"))


def list_objectives() -> list[str]:
    return sorted(_OBJECTIVES)


def objective_spec(name: str) -> ObjectiveSpec:
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {list_objectives()}")
    return _OBJECTIVES[name]


def get_objective(name: str, **options: Any) -> Objective:
    """The objective called ``name`` with ``options`` bound (only pixel_mim has any: mean, std, norm_pix, eps)."""
    spec = objective_spec(name)
    accepted = [p.name for p in inspect.signature(spec.fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"objective {name!r} has no option(s) {unknown}; it accepts {accepted or 'no options'}")
    return Objective(spec, dict(options))


class ObjectiveModule(nn.Module):
    """``student`` + objective as one module whose ``forward(batch, targets)`` returns the objective's dict.

    Wrap THIS in DDP (not the bare student): DDP synchronises gradients only for computations that go
    through the wrapper's ``forward``, and objectives call ``student.forward_features`` and
    ``student.lm_head`` directly. The teacher stays outside.
    """

    def __init__(self, student: nn.Module, objective: Objective | str):
        super().__init__()
        self.student = student
        self.objective = get_objective(objective) if isinstance(objective, str) else objective

    def forward(self, batch: dict, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.objective(self.student, batch, targets)
