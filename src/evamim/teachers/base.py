"""The Teacher: a frozen vision encoder that turns the student's images into patch-feature targets.

Contract (every backend):

    targets = teacher(images)     # images (B, 3, H, W), normalised with the STUDENT's mean/std
                                  # targets (B, N, D) float32, N = student's patch grid h*w, row-major

- The teacher sees the same crop and flip as the student. It converts the normalisation to its own
  (``x * s_std + s_mean - t_mean) / t_std``) and resizes the image so that its own patch grid equals the
  student's (e.g. a 14x14 student grid and a patch-14 teacher -> 196 px); its positional embedding is
  resampled once, at construction, to that grid.
- It is frozen: no parameter requires grad, it stays in eval mode even when ``.train()`` is called, and it
  runs under ``torch.inference_mode()``. Targets are ordinary (not inference-mode) tensors, so the loss may use them.
- It is never wrapped by DDP/FSDP: it has nothing to train and nothing to synchronise. Move it with
  ``teacher.to(device)`` and call it on each rank's local batch.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evamim.dtypes import LONG_NAMES, PRECISIONS
from evamim.teachers.errors import GridMismatchError, grid_text

from evamim.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)

_DTYPES = {**PRECISIONS, **{long: PRECISIONS[short] for long, short in LONG_NAMES.items()}}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a torch dtype, or one of 'fp32'/'bf16'/'fp16' (and their long names) -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise ValueError(f"teacher dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"teacher dtype must be None, a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{what} must have 3 values (one per RGB channel), got {values}")
    return values  # type: ignore[return-value]


def _pair(grid: Sequence[int] | int, what: str) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    grid = tuple(int(v) for v in grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"{what} must be a positive (height, width) patch grid, got {grid}")
    return grid  # type: ignore[return-value]


class TokenEncoder(nn.Module):
    """Backend adapter: teacher-normalised images (B, 3, h*p, w*p) -> patch targets (B, h*w, D).

    Subclasses set ``patch_size`` (int), ``native_grid`` ((h, w) the weights were trained at) and
    ``embed_dim`` (D), and implement ``forward`` and ``set_grid``.
    """

    patch_size: int
    native_grid: tuple[int, int]
    embed_dim: int

    def set_grid(self, grid: tuple[int, int]) -> None:
        """Make the encoder run on a (h, w) patch grid (resample position embeddings), or raise
        GridMismatchError saying why it cannot."""
        raise NotImplementedError


def keep_blocks(blocks: nn.ModuleList | nn.Sequential, layer: int | None, what: str) -> nn.Module:
    """The blocks up to and including ``layer`` (an index into ``blocks``; negative counts from the end).

    A teacher that targets an intermediate layer does not need the blocks after it, so they are dropped
    instead of being run and thrown away.
    """
    if layer is None:
        return blocks
    depth = len(blocks)
    if int(layer) != layer or not -depth <= layer < depth:
        raise ValueError(f"layer={layer!r} is out of range for {what} with {depth} blocks; use 0..{depth - 1} or -1..-{depth}")
    last = layer % depth
    return blocks[: last + 1]


class Teacher(nn.Module):
    """A frozen teacher. See the module docstring for the contract.

    Attributes:
        spec: the spec string it was built from.
        embed_dim: D, the size of each target vector.
        patch_size: the teacher's patch size in pixels.
        grid_size: (h, w), the patch grid of the targets (the student's grid when one was given).
        num_patches: h * w = N.
        image_size: (h * patch_size, w * patch_size), the resolution the teacher runs at.
        native_grid: the grid the teacher's weights were trained at.
        mean, std: the teacher's own input normalisation.
        student_mean, student_std: the normalisation of the images it is given.
        dtype: compute dtype: None = the caller's autocast state, float32 = autocast off, bf16/fp16 = autocast.
    """

    def __init__(
        self,
        encoder: TokenEncoder,
        *,
        spec: str,
        mean: Sequence[float],
        std: Sequence[float],
        student_mean: Sequence[float] = CLIP_MEAN,
        student_std: Sequence[float] = CLIP_STD,
        student_grid: Sequence[int] | int | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.mean = _triple(mean, "teacher mean")
        self.std = _triple(std, "teacher std")
        self.student_mean = _triple(student_mean, "student_mean")
        self.student_std = _triple(student_std, "student_std")
        self.dtype = resolve_dtype(dtype)
        self.patch_size = int(encoder.patch_size)
        self.native_grid = tuple(encoder.native_grid)
        self.student_grid = None if student_grid is None else _pair(student_grid, "student_grid")
        self.grid_size = self.student_grid or self.native_grid
        if self.grid_size != self.native_grid:
            encoder.set_grid(self.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.image_size = (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
        self.embed_dim = int(encoder.embed_dim)
        self._same_normalisation = self.mean == self.student_mean and self.std == self.student_std
        self.register_buffer("_student_mean", torch.tensor(self.student_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_student_std", torch.tensor(self.student_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_teacher_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_teacher_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        # Always eval: dropout, drop-path and patch dropout would make the targets noisy.
        return super().train(False)

    def extra_repr(self) -> str:
        return (
            f"spec={self.spec!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
            f"grid={grid_text(self.grid_size)} (native {grid_text(self.native_grid)}), image_size={self.image_size}, "
            f"dtype={self.dtype}"
        )

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.student_grid is None:
            return
        height, width = images.shape[-2:]
        grid_h, grid_w = self.student_grid
        if height % grid_h or width % grid_w or height // grid_h != width // grid_w:
            raise GridMismatchError(
                f"teacher {self.spec!r} was built for a student grid of {grid_text(self.student_grid)} patches "
                f"(teacher grid {grid_text(self.grid_size)} at {self.image_size[0]}x{self.image_size[1]} px), but "
                f"got {height}x{width} px images, which are not {grid_text(self.student_grid)} square student "
                f"patches; build the teacher with student_grid equal to the student's grid at this input size"
            )

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised (B, 3, H, W) -> teacher-normalised float32 (B, 3, *image_size)."""
        self._check_input(images)
        x = images.float()
        if tuple(x.shape[-2:]) != self.image_size:
            # Interpolation weights sum to one, so resizing commutes with the per-channel affine renormalisation.
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        if not self._same_normalisation:
            x = (x * self._student_std + self._student_mean - self._teacher_mean) / self._teacher_std
        return x

    def _autocast(self, device_type: str):
        if self.dtype is None:
            return contextlib.nullcontext()
        if self.dtype == torch.float32:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), student-normalised -> targets (B, N, D) float32 on the grid ``grid_size``."""
        # Inference mode skips autograd's bookkeeping (version counters, views) for the whole forward.
        with torch.inference_mode():
            x = self.prepare(images)
            with self._autocast(x.device.type):
                targets = self.encoder(x)
            expected = (images.shape[0], self.num_patches, self.embed_dim)
            if tuple(targets.shape) != expected:
                raise RuntimeError(
                    f"teacher {self.spec!r} produced targets of shape {tuple(targets.shape)}, expected {expected}"
                )
            targets = targets.float()
        # Inference tensors cannot be saved for the student's backward pass: one small copy makes an ordinary one.
        return targets.clone()
