"""``create_teacher(spec, ...)``: parse a teacher spec string and build a frozen Teacher."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Sequence

import torch

from evamim.teachers.base import CLIP_MEAN, CLIP_STD, Teacher

# backend prefix -> (module, example spec)
BACKENDS = {
    "open_clip": ("evamim.teachers.open_clip", "open_clip:ViT-L-14-quickgelu/openai"),
    "hf": ("evamim.teachers.hf", "hf:openai/clip-vit-large-patch14"),
    "timm": ("evamim.teachers.timm", "timm:vit_large_patch14_clip_quickgelu_224.openai"),
    "local": ("evamim.teachers.local", "local:/path/to/evamim_model_dir"),
}


def parse_spec(spec: str) -> tuple[str, str]:
    """'backend:target' -> (backend, target); raises ValueError naming the valid forms."""
    backend, sep, target = str(spec).partition(":")
    if not sep or backend not in BACKENDS or not target:
        examples = ", ".join(repr(example) for _, example in BACKENDS.values())
        raise ValueError(f"invalid teacher spec {spec!r}: expected BACKEND:TARGET with BACKEND in {sorted(BACKENDS)}, e.g. {examples}")
    return backend, target


# create_teacher's own keyword arguments that a config may carry among the backend options.
TEACHER_OPTIONS = ("mean", "std")

# backend prefix -> what to install when its package is missing
_PACKAGES = {"open_clip": "open_clip_torch: pip install 'evamim[clip]'", "hf": "transformers: pip install 'evamim[hf]'"}


def accepted_options(backend: str) -> list[str]:
    """The options a backend's teachers take (its ``build``'s keyword-only arguments), e.g. ``layer``."""
    module = importlib.import_module(BACKENDS[backend][0])
    return [
        name for name, parameter in inspect.signature(module.build).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "spec"
    ]


def check_teacher(spec: str, options: dict[str, Any] | None = None) -> int | None:
    """Everything :func:`create_teacher` can check without weights, in about a second: the spec, the option
    names, and what the backend can tell from the model name -- an unknown model (with close matches), an
    unknown tag, a weights file that does not exist, a model that is not a ViT. The architecture may be
    instantiated on the meta device for that (no memory, no weights, no download).

    Returns: the width D of the targets when the backend can tell without weights (open_clip, timm, local),
    else None.

    Raises:
        ValueError: the spec or the model (the message says what to use instead).
        TypeError: an unknown option.
        TeacherWeightsNotFoundError: a weights file or directory named in the spec does not exist.
    """
    backend, target = parse_spec(spec)
    options = {key: value for key, value in (options or {}).items() if key not in TEACHER_OPTIONS}
    accepted = accepted_options(backend)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        close = [match for key in unknown for match in difflib.get_close_matches(str(key), accepted, n=1)]
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise TypeError(f"teacher {spec!r}: unknown option(s) {unknown}{hint}; {backend} teachers accept "
                        f"{accepted + list(TEACHER_OPTIONS)}")
    check = getattr(importlib.import_module(BACKENDS[backend][0]), "check", None)
    if check is None:
        return None
    try:
        return check(target, spec=spec, **options)
    except ModuleNotFoundError as error:
        if backend not in _PACKAGES or error.name not in ("open_clip", "transformers"):
            raise
        raise ValueError(f"teacher {spec!r}: the {backend} backend needs {_PACKAGES[backend]}") from None


def _build_encoder(backend: str, target: str, spec: str, options: dict[str, Any]):
    module = importlib.import_module(BACKENDS[backend][0])
    return module.build(target, spec=spec, **options)


def create_teacher(
    spec: str,
    *,
    student_mean: Sequence[float] = CLIP_MEAN,
    student_std: Sequence[float] = CLIP_STD,
    student_grid: Sequence[int] | int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> Teacher:
    """Build a frozen teacher from a spec string.

    Specs:
        ``open_clip:MODEL/PRETRAINED``  PRETRAINED = open_clip tag or weights file (EVA-01: ViT-L-14-quickgelu/openai)
        ``hf:MODEL_ID_OR_DIR``          transformers CLIPVisionModelWithProjection
        ``timm:MODEL[.TAG][/FILE]``     any timm ViT-family model
        ``local:DIR``                   an evamim model directory, or a saved EvaClip (targets projected to its
                                        joint embedding, ``ln_post(tokens) @ proj`` like open_clip teachers)

    Args:
        student_mean, student_std: the normalisation of the images the teacher will be given.
        student_grid: the student's patch grid (h, w); the teacher resizes its input and resamples its
            position embeddings so its targets lie on this grid. None = the teacher's native grid.
        dtype: compute dtype: None = follow the caller's autocast, 'fp32' = autocast off, 'bf16'/'fp16' =
            autocast to that dtype. Weights stay fp32.
        device: where to move the teacher.
        mean, std: override the teacher's own input normalisation (else from its pretrained config).
        options: backend options -- all: ``layer`` (block index whose tokens are the targets; default the
            last); open_clip/hf: ``project`` (default True), ``cache_dir``; hf: ``revision``; timm:
            ``project`` (default False: in timm the head is the CLIP projection only for CLIP models),
            ``cache_dir``, ``model_kwargs``.

    Returns: a Teacher: ``teacher(images (B, 3, H, W)) -> (B, N, D)`` float32; ``teacher.embed_dim`` = D.
    Never wrap it in DDP/FSDP.
    """
    check_teacher(spec, options)  # the cheap refusals first: before weights are downloaded or a model is built
    backend, target = parse_spec(spec)
    encoder, own_mean, own_std = _build_encoder(backend, target, spec, options)
    teacher = Teacher(
        encoder,
        spec=spec,
        mean=own_mean if mean is None else mean,
        std=own_std if std is None else std,
        student_mean=student_mean,
        student_std=student_std,
        student_grid=student_grid,
        dtype=dtype,
    )
    if device is not None:
        teacher.to(device)
    return teacher
