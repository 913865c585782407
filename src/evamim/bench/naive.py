"""The EVA pre-training loop a user writes without evamim, for ``evamim bench pretrain --compare naive``.

What a careful user builds from the public pieces of timm and open_clip and EVA's recipe:

- student: ``timm.models.eva.Eva`` of the same architecture as the evamim preset, plus a learned mask token
  (an ``nn.Parameter``, put in with ``torch.where`` before the cls token and positions, as BEiT/EVA do) and
  an ``lm_head`` Linear to the teacher's width, applied to the masked tokens only;
- teacher: open_clip's CLIP (``open_clip.create_model(name)``; the vision tower kept), built at the
  resolution whose patch grid equals the student's (``force_image_size``), images resized to it with
  ``F.interpolate`` (bicubic, antialiased); targets = ``ln_post`` patch tokens ``@ visual.proj``, under
  ``torch.no_grad()``;
- loss: ``-F.cosine_similarity(pred, target[mask]).mean()`` over the masked tokens of the whole batch;
- ``torch.autocast`` in the chosen precision (a ``GradScaler`` for fp16), ``torch.optim.AdamW`` with torch's
  default implementation and EVA's hyper-parameters in one group, ``clip_grad_norm_(..., 3.0)``,
  ``zero_grad()``.

Nothing here imports evamim's training code: the benchmark copies evamim's weights in (``load_from``) so that
both loops compute the same loss, and times the two side by side.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class NaiveMimStudent(nn.Module):
    """timm's Eva + mask token + lm_head: ``(images (B, 3, H, W), mask (B, N) bool, True = masked)
    -> predictions (M, D)`` for the M masked patches of the whole batch (row-major over (B, N))."""

    def __init__(self, eva_kwargs: dict[str, Any], target_dim: int):
        super().__init__()
        from timm.models.eva import Eva

        self.eva = Eva(**eva_kwargs)
        if self.eva.dynamic_img_size:
            raise ValueError("the naive student is written for a fixed input size (dynamic_img_size=False)")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.eva.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head = nn.Linear(self.eva.embed_dim, target_dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.eva.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        eva = self.eva
        x = eva.patch_embed(images)  # (B, N, C)
        x = torch.where(mask[..., None], self.mask_token, x)
        x = torch.cat([eva.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if eva.pos_embed is not None:
            x = x + eva.pos_embed
        rope = eva.rope.get_embed() if eva.rope is not None else None
        x = eva.norm_pre(x)
        for block in eva.blocks:
            if eva.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope=rope, use_reentrant=False)
            else:
                x = block(x, rope=rope)
        x = eva.norm(x)
        return self.lm_head(x[:, 1:][mask])


class NaiveClipTeacher(nn.Module):
    """open_clip's CLIP vision tower giving EVA's targets: images normalised for the student (B, 3, H, W)
    -> (B, N, D) = ``ln_post`` patch tokens ``@ proj`` at ``image_size`` (resized there when needed).

    ``student_mean``/``student_std`` and ``mean``/``std``: when they differ the images are re-normalised for
    the tower (the CLIP normalisation on both sides is the usual case, and then nothing is done)."""

    def __init__(self, name: str, image_size: tuple[int, int], *, device: torch.device | str = "cpu",
                 student_mean: Sequence[float] | None = None, student_std: Sequence[float] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        import open_clip

        clip = open_clip.create_model(name, device=device, force_image_size=tuple(image_size))
        visual = clip.visual
        if not hasattr(visual, "transformer") or getattr(visual, "proj", None) is None:
            raise ValueError(f"open_clip model {name!r}: the naive teacher is written for OpenAI-style ViT towers "
                             f"with a `proj` (not {type(visual).__name__} / timm trunks)")
        visual.output_tokens = True  # visual(x) -> (pooled, ln_post(x)[:, 1:])
        self.visual = visual.eval().requires_grad_(False)
        del clip  # the text tower is not needed
        self.image_size = tuple(image_size)
        renormalise = None not in (student_mean, student_std, mean, std) and (
            tuple(student_mean) != tuple(mean) or tuple(student_std) != tuple(std))
        self.renormalise = (
            [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (student_mean, student_std, mean, std)]
            if renormalise else None
        )

    def train(self, mode: bool = True) -> "NaiveClipTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        if self.renormalise is not None:
            s_mean, s_std, t_mean, t_std = self.renormalise
            images = (images * s_std + s_mean - t_mean) / t_std
        _, tokens = self.visual(images)
        return tokens @ self.visual.proj


def clip_mim_loss(student: NaiveMimStudent, teacher: NaiveClipTeacher, images: torch.Tensor,
                  masks: torch.Tensor) -> torch.Tensor:
    """EVA's loss: negative mean cosine between the student's predictions and the teacher's features at the
    masked patches of the whole batch (boolean indexing: the count per image may vary)."""
    target = teacher(images)
    pred = student(images, masks)
    return -F.cosine_similarity(pred.float(), target[masks].float(), dim=-1).mean()


class NaiveLoop:
    """One training step of the naive loop on a fixed batch: ``loop.step()``.

    ``images``: (B, 3, H, W) float, normalised for the student, on ``device``; ``masks``: (B, N) bool.
    """

    def __init__(self, student: NaiveMimStudent, teacher: NaiveClipTeacher, images: torch.Tensor,
                 masks: torch.Tensor, *, precision: str, lr: float, betas: Sequence[float], eps: float,
                 weight_decay: float, clip_grad: float | None):
        self.student = student
        self.teacher = teacher
        self.images = images
        self.masks = masks
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.device_type = images.device.type
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=tuple(betas), eps=eps,
                                           weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.clip_grad = clip_grad

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def loss(self) -> torch.Tensor:
        with self.autocast():
            return clip_mim_loss(self.student, self.teacher, self.images, self.masks)

    def step(self) -> None:
        loss = self.loss()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
