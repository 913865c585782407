"""Segmentation's loss, step and metrics: per-pixel cross entropy, and a confusion matrix scored as mIoU,
mean class accuracy and pixel accuracy after sliding-window inference.

Conventions: logits (B, K, H, W); labels (B, H, W) long, 255 = ignore; scores in percent.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from evamim.data.segmentation import IGNORE_INDEX

IOU_CONVENTION = (
    "IoU = TP / (TP + FP + FN) per class over all evaluated pixels; pixels labelled 255 are not counted. "
    "A class absent from both labels and predictions has IoU NaN (null in JSON) and is left out of mIoU; "
    "a class predicted but never labelled has IoU 0 and counts. Values in percent."
)


# -------------------------------------------------------------------------------------------- training
def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel cross entropy averaged over the labelled pixels, in fp32.

    logits (B, K, H, W); labels (B, H, W) long with 255 = ignore. ``labelled``: the number of labelled pixels
    to divide by (default: this batch's). A batch without labelled pixels gives 0 (with a graph), not NaN.
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if labelled is None:
        labelled = (labels != IGNORE_INDEX).sum()
    return total / labelled.clamp(min=1)


class SegmentationStep:
    """The objective as the loop sees it: ``(model, batch) -> {"loss", "pixel_acc"}`` on crops and their labels.

    With several processes the loss is the mean over the labelled pixels of the global batch (crops hold
    different numbers of ignored pixels): each process divides its sum by the global count, times the number
    of processes because the gradient all-reduce averages. One scalar all-reduce per step buys the exact
    one-process result.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        logits = model(images)
        valid = labels != IGNORE_INDEX
        labelled = valid.sum().float()
        correct = ((logits.argmax(1) == labels) & valid).sum().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = torch.stack([labelled, correct])
            dist.all_reduce(counts)
            world = dist.get_world_size()
            # The logged values are averaged over processes: scale so that the average is the global value.
            return {"loss": segmentation_loss(logits, labels, counts[0] / world),
                    "pixel_acc": 100.0 * counts[1] / counts[0].clamp(min=1)}
        return {"loss": segmentation_loss(logits, labels, labelled),
                "pixel_acc": 100.0 * correct / labelled.clamp(min=1)}


# ------------------------------------------------------------------------------------------ evaluation
class ConfusionMatrix:
    """Pixel counts of (label, prediction) pairs: a (K, K) int64 matrix, rows = label, columns = prediction.

    Pixels labelled 255 are skipped whatever their prediction. See ``IOU_CONVENTION`` for how absent classes
    are treated.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """prediction and label: integer tensors of the same shape; label 255 = ignore."""
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != IGNORE_INDEX
        label, prediction = label[valid].long(), prediction[valid].long().to(label.device)
        k = self.num_classes
        if label.numel() and (label.min() < 0 or label.max() >= k):
            raise ValueError(f"labels must be in [0, {k}) or {IGNORE_INDEX}; found {int(label.min())}..{int(label.max())}")
        if prediction.numel() and (prediction.min() < 0 or prediction.max() >= k):
            raise ValueError(f"predictions must be in [0, {k}); found {int(prediction.min())}..{int(prediction.max())}")
        counts = torch.bincount(label * k + prediction, minlength=k * k).reshape(k, k)
        self.matrix += counts.to(self.matrix.device)

    def iou(self) -> torch.Tensor:
        """(K,) float64 IoU per class in [0, 1]; NaN for a class in neither the labels nor the predictions."""
        matrix = self.matrix.double()
        intersection = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - intersection
        return intersection / union  # 0 / 0 = NaN for absent classes

    def class_accuracy(self) -> torch.Tensor:
        """(K,) float64 recall per class (correct / labelled pixels); NaN for a class never labelled."""
        matrix = self.matrix.double()
        return matrix.diagonal() / matrix.sum(1)

    def summary(self) -> dict[str, float]:
        """``mIoU`` (nanmean of IoU), ``mAcc`` (nanmean of class accuracy), ``aAcc`` (pixel accuracy), in percent."""
        total = self.matrix.sum()
        return {
            "mIoU": 100.0 * float(self.iou().nanmean()),
            "mAcc": 100.0 * float(self.class_accuracy().nanmean()),
            "aAcc": 100.0 * float(self.matrix.diagonal().sum().double() / total) if total else float("nan"),
        }


class SegEvaluation:
    """Sliding-window logits on each validation image (resized to the label's size), argmax, confusion matrix
    (an :class:`~evamim.tasks.runner.Evaluation`: the runner adds up the matrices of all processes). Keeps the
    last matrix in ``self.last`` for the per-class results."""

    def __init__(self, loader, device: torch.device, num_classes: int, window: tuple[int, int], stride: int,
                 windows_per_batch: int):
        self.loader = loader
        self.device = device
        self.num_classes = num_classes
        self.window = window
        self.stride = stride
        self.windows_per_batch = windows_per_batch
        self.last: ConfusionMatrix | None = None

    def score(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from evamim.models.seg_heads import slide_inference

        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        logits = slide_inference(model, images, self.num_classes, self.window, self.stride, self.windows_per_batch)
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        matrix = ConfusionMatrix(self.num_classes, self.device)
        matrix.update(logits.argmax(1), labels)
        return {"confusion": matrix.matrix.double().cpu()}

    def finalize(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
        matrix = ConfusionMatrix(self.num_classes)
        if "confusion" in sums:
            matrix.matrix += sums["confusion"].round().long()
        if not int(matrix.matrix.sum()):
            raise RuntimeError("the validation data has no labelled pixels to score")
        self.last = matrix
        return matrix.summary()

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """One process's evaluation on its own (outside the runner)."""
        sums = {"confusion": sum(self.score(model, batch)["confusion"] for batch in self.loader)}
        return self.finalize(sums)


def nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else 100.0 * v for v in values.tolist()]
