"""Pre-training objectives: ``objective(student, batch, targets) -> dict[str, Tensor]``.

- ``student``: an EvaViT-like module (not a DDP wrapper: see ``ObjectiveModule``) with
  ``forward_features(images, mask=None) -> (B, 1 + N, C)``, ``num_prefix_tokens``, ``lm_head`` and
  ``patch_embed.patch_size``.
- ``batch``: ``{"images": (B, 3, H, W) normalised float, "masks": (B, N) bool, True = masked}``; ``masks``
  only for the masked objectives.
- ``targets``: the teacher's (B, N, D) patch features, or None for objectives without a teacher.

Every objective returns ``loss`` (a scalar float32 tensor, fp32 even under autocast) and named, detached
metrics. The masked objectives never index with the boolean mask (``features[masks]`` makes the GPU report
how many tokens it selected, a device sync every step): the head runs on every token and the loss is the
mask-weighted mean over the whole batch, which is the mean over the masked tokens whatever their number per
image (block masking varies it). A batch without any masked patch gives a NaN loss, which the training
loop's non-finite guard reports. ``clip_mae`` (:mod:`evamim.pretrain.mae`) needs the same count in every image
and gathers with indices instead.
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


def _check_targets(targets: torch.Tensor | None, tokens: torch.Tensor | tuple[int, int], objective: str) -> torch.Tensor:
    """``tokens``: the student's (B, N, ...) patch tokens or their (B, N) shape."""
    shape = tuple(tokens) if isinstance(tokens, tuple) else tuple(tokens.shape[:2])
    if targets is None:
        raise ValueError(f"{objective} needs teacher targets (B, N, D), got None")
    if tuple(targets.shape[:2]) != shape:
        raise ValueError(
            f"{objective}: targets have shape {tuple(targets.shape)} but the student has {shape} "
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


def _negative_cosine(prediction: torch.Tensor, target: torch.Tensor,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D), (..., D), optional (...) 0/1 weights -> (loss = -mean cos, mean cos detached), both float32;
    with ``weights`` the mean is over the tokens weighted 1."""
    with _fp32(prediction.device):
        cosine = F.cosine_similarity(prediction.float(), target.float(), dim=-1)
        mean_cosine = cosine.mean() if weights is None else _weighted_mean(cosine, weights)
    return -mean_cosine, mean_cosine.detach()


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values * weights) / sum(weights) in float32: the mean over the selected tokens, without asking the
    device how many there are (NaN when none is selected, like the mean of an empty selection)."""
    weights = weights.to(torch.float32)
    return (values * weights).sum() / weights.sum()


def clip_mim(student: nn.Module, batch: dict, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """EVA: predict the teacher's features at the masked patches from the visible ones.

    ``feats = student.forward_features(images, mask=masks)[:, 1:]`` (B, N, C);
    ``pred = student.lm_head(feats)`` (B, N, D);
    ``loss = -mean cos(pred, targets)`` over the M = masks.sum() masked tokens of the whole batch (as EVA's
    ``lm_head(feats[masks])``; the head on the visible tokens costs ~0.2 % of the step and saves a device sync).
    Metrics: ``cos_masked`` (mean cosine), ``num_masked`` (M, as float).
    """
    images, masks = batch["images"], _masks(batch)
    features = _patch_tokens(student, images, masks)
    _check_masks(masks, features)
    targets = _check_targets(targets, features, "clip_mim")
    prediction = student.lm_head(features)
    _check_head_width(prediction, targets.shape[-1], "clip_mim", "the teacher")
    loss, cosine = _negative_cosine(prediction, targets, weights=masks)
    return {"loss": loss, "cos_masked": cosine, "num_masked": masks.sum().float()}


def clip_mae(student: nn.Module, batch: dict, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """EVA, MAE-style: the encoder sees only the visible patches, a decoder predicts the teacher's features at
    the masked ones (:mod:`evamim.pretrain.mae`; EVA-L's recipe).

    ``student`` is a :class:`~evamim.pretrain.mae.MaeStudent`; every image has the same number M of masked
    patches. ``visible`` (B, K) / ``masked`` (B, M) indices come with the batch (the pre-training step adds them
    on the CPU) or are computed from ``masks``. ``pred = student(images, visible, masked)`` (B, M, D);
    ``loss = -mean cos(pred, targets at masked)`` over the B * M masked tokens.
    Metrics: ``cos_masked``, ``num_masked`` (B * M, as float).
    """
    from evamim.pretrain.mae import mask_indices

    images, masks = batch["images"], _masks(batch)
    if not hasattr(student, "decoder") or not hasattr(student, "encoder"):
        raise TypeError(f"clip_mae needs an encoder-decoder student (evamim.pretrain.mae.MaeStudent), got "
                        f"{type(student).__name__}")
    grid = student.encoder.grid_size
    if tuple(masks.shape[1:]) != (grid[0] * grid[1],):
        raise ValueError(f"batch['masks'] has shape {tuple(masks.shape)} but the student has {grid[0] * grid[1]} "
                         "patches: the masks were made for another patch grid")
    targets = _check_targets(targets, tuple(masks.shape), "clip_mae")
    visible, masked = batch.get("visible"), batch.get("masked")
    if visible is None or masked is None:
        visible, masked = mask_indices(masks)
    prediction = student(images, visible, masked)
    _check_head_width(prediction, targets.shape[-1], "clip_mae", "the teacher")
    target = targets.gather(1, masked.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
    loss, cosine = _negative_cosine(prediction, target)
    count = torch.full((), float(masked.numel()), device=prediction.device)  # a fill, not a host-to-device copy
    return {"loss": loss, "cos_masked": cosine, "num_masked": count}


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
    ``pred = student.lm_head(feats)`` (B, N, p*p*3); ``loss = mean squared error`` over the masked patches
    (mask-weighted, see clip_mim). ``targets`` is ignored. Metrics: ``num_masked``.
    """
    images, masks = batch["images"], _masks(batch)
    features = _patch_tokens(student, images, masks)
    _check_masks(masks, features)
    patch_size = int(student.patch_embed.patch_size)
    prediction = student.lm_head(features)
    with _fp32(images.device):
        mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        pixels = patchify(images.float() * std_t + mean_t, patch_size)
        if norm_pix:
            pixels = (pixels - pixels.mean(dim=-1, keepdim=True)) / (pixels.var(dim=-1, keepdim=True) + eps) ** 0.5
        _check_head_width(prediction, pixels.shape[-1], "pixel_mim", f"a {patch_size}x{patch_size}x3 patch")
        loss = _weighted_mean((prediction.float() - pixels).square().mean(dim=-1), masks)
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
    ``encoder_decoder``: the student is an encoder on the visible patches + a decoder
    (:class:`~evamim.pretrain.mae.MaeStudent`); every image then needs the same number of masked patches, the
    step adds ``visible``/``masked`` indices to the CPU batch, and only the encoder is exported.
    ``default_masking``: ``masking.kind`` when the config leaves it unset (``block`` = EVA, ``random`` = MAE).
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
    encoder_decoder: bool = False
    default_masking: str = "block"

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
                       data_options: Sequence[str] = (), encoder_decoder: bool = False,
                       default_masking: str = "block") -> ObjectiveSpec:
    """Make ``fn(student, batch, targets, **options) -> {"loss": ..., metrics}`` available as
    ``objective: NAME`` in ``evamim pretrain`` (see :class:`ObjectiveSpec` for the properties)."""
    if name in _OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    if head not in ("teacher", "pixels"):
        raise ValueError(f"head must be 'teacher' or 'pixels', got {head!r}")
    if not eval_metrics or eval_metrics[0] != "loss":
        raise ValueError(f"eval_metrics must start with 'loss', got {list(eval_metrics)}")
    if default_masking not in ("block", "random"):
        raise ValueError(f"default_masking must be 'block' or 'random', got {default_masking!r}")
    if encoder_decoder and not uses_masks:
        raise ValueError("an encoder-decoder objective needs masks (uses_masks=True)")
    if uses_mask_token is None:
        uses_mask_token = uses_masks and not encoder_decoder
    spec = ObjectiveSpec(name, fn, description, needs_teacher, uses_masks, uses_mask_token, head, tuple(eval_metrics),
                         eval_weight, tuple(data_options), encoder_decoder, default_masking)
    _OBJECTIVES[name] = spec
    return spec


register_objective("clip_mim", clip_mim, description="EVA: teacher features at the masked patches, negative cosine",
                   needs_teacher=True, uses_masks=True, eval_metrics=("loss", "cos_masked"), eval_weight="num_masked")
register_objective("clip_mae", clip_mae,
                   description="EVA, MAE-style: encoder on the visible patches, a decoder predicts the teacher's "
                               "features at the masked ones",
                   needs_teacher=True, uses_masks=True, eval_metrics=("loss", "cos_masked"), eval_weight="num_masked",
                   encoder_decoder=True, default_masking="random")
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
