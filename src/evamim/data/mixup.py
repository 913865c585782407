"""Batch-level mixup / cutmix for fine-tuning, producing soft targets (wraps ``timm.data.Mixup``)."""

from __future__ import annotations

from typing import Any

import torch

from evamim.data.config import DataConfig


class BatchMixup:
    """Mixes ``batch["images"]`` in place of the batch and adds ``batch["targets"]``.

    ``batch["images"]``: ``(B, 3, H, W)`` float, B even (timm pairs sample i with B-1-i);
    ``batch["labels"]``: ``(B,)`` long. Adds ``batch["targets"]``: ``(B, num_classes)`` float soft
    targets (label smoothing folded in) that each sum to 1; ``labels`` are left untouched for
    accuracy metrics. Run it on the device, after the batch was moved there.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        mode: str = "batch",
    ):
        from timm.data import Mixup

        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("BatchMixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = num_classes
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, labels = batch["images"], batch.get("labels")
        if labels is None:
            raise KeyError("mixup/cutmix needs batch['labels']: build the loader with data.labels on")
        if images.shape[0] % 2:
            raise ValueError(f"mixup/cutmix needs an even batch size, got {images.shape[0]}; use drop_last")
        mixed, targets = self.mixup(images.clone(), labels)
        return {**batch, "images": mixed, "targets": targets}


def build_mixup(cfg: DataConfig, num_classes: int) -> BatchMixup | None:
    """``BatchMixup`` from the fine-tuning fields of ``cfg``, or None when both alphas are 0."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return BatchMixup(
        num_classes,
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
    )


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot ``(B, num_classes)`` targets with label smoothing, for batches mixup left alone."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
