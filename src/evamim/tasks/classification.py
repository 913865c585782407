"""Image classification pieces of ``evamim finetune``: the loss, the step, the evaluation, the best-model export.

Conventions: logits (B, K); labels (B,) long; targets (B, K) probabilities; accuracies in percent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from evamim import atomic
from evamim.engine import Hook, Trainer, unwrap_model
from evamim.engine.ema import ModelEma
from evamim.tasks.common import format_table

logger = logging.getLogger(__name__)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k targets[k] * log_softmax(logits)[k]``, computed in fp32.

    logits (B, K); targets (B, K) probabilities (each row sums to 1: mixup/cutmix mixtures of label-smoothed
    one-hot vectors). Equals ``F.cross_entropy(logits, labels, label_smoothing=s)`` for smoothed one-hot targets.
    """
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassificationStep:
    """The objective as the loop sees it: ``(model, batch) -> {"loss": ...}``.

    batch: ``images`` (B, 3, H, W) and ``labels`` (B,) long. Targets are mixup/cutmix soft targets (drawn on the
    device, per micro-batch) or, without mixing, one-hot targets with label smoothing.
    """

    def __init__(self, num_classes: int, label_smoothing: float, mixup, device: torch.device):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = mixup
        self.device = device

    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) -> (possibly mixed images, (B, K) soft targets)."""
        from evamim.data.mixup import smooth_targets

        if self.mixup is None:
            return images, smooth_targets(labels, self.num_classes, self.label_smoothing)
        mixed = self.mixup({"images": images, "labels": labels})
        return mixed["images"], mixed["targets"]

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        images, targets = self.targets(images, labels)
        return {"loss": soft_target_cross_entropy(model(images), targets)}


# ------------------------------------------------------------------------------------------ evaluation
class ClassifierEvaluation:
    """Top-1 / top-5 accuracy and mean cross entropy of the model and, if given, its EMA (an
    :class:`~evamim.tasks.runner.Evaluation`: sums per batch, all-reduced by the runner). Each batch is decoded
    once and run through both. Metrics: ``top1``, ``top5``, ``loss`` and ``ema_top1``, ... for the EMA."""

    def __init__(self, loader, device: torch.device, ema: ModelEma | None = None):
        self.loader = loader
        self.device = device
        self.ema = ema

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"": model, **({"ema_": self.ema.module} if self.ema is not None else {})}

    def score(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        sums = {"count": torch.tensor(float(labels.shape[0]), dtype=torch.float64)}
        for prefix, net in self.models(model).items():
            sums.update({prefix + key: value for key, value in classification_sums(net(images), labels).items()})
        return sums

    def finalize(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
        count = float(sums.get("count", 0))
        if count == 0:
            raise RuntimeError("the validation data yielded no images")
        return {name: 100.0 * float(value) / count if "top" in name else float(value) / count
                for name, value in sums.items() if name != "count"}


def classification_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hits in the top 1 / top 5 and the summed cross entropy of one batch (float64, on the CPU)."""
    logits = logits.float()
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return {
        "top1": hits[:, :1].any(dim=-1).sum().double().cpu(),
        "top5": hits.any(dim=-1).sum().double().cpu(),
        "loss": F.cross_entropy(logits, labels, reduction="sum").double().cpu(),
    }


def evaluate_classifiers(models: Mapping[str, nn.Module], loader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross entropy of each model over one pass of ``loader`` in
    this process. ``models`` maps a metric prefix to a model in eval mode (e.g. ``{"": model, "ema_": ema}``)."""
    sums: dict[str, torch.Tensor] = {}
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        scores = {"count": torch.tensor(float(labels.shape[0]), dtype=torch.float64)}
        for prefix, model in models.items():
            scores.update({prefix + k: v for k, v in classification_sums(model(images), labels).items()})
        for name, value in scores.items():
            sums[name] = sums.get(name, 0) + value
    return ClassifierEvaluation(None, device).finalize(sums)


class BestCheckpoints(Hook):
    """After each evaluation: remember the metrics, and export the model (``best/``) and the EMA (``best_ema/``)
    as evamim model directories whenever their top-1 is the best so far. The records survive a resume."""

    def __init__(self, output_dir: Path, ema: ModelEma | None, is_main_process: bool = True):
        self.output_dir = Path(output_dir)
        self.ema = ema
        self.is_main_process = is_main_process
        self.latest: dict[str, Any] = {}
        self.best: dict[str, dict[str, Any]] = {"model": {}, "ema": {}}

    def on_eval(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        epochs = trainer.step / trainer.steps_per_epoch if trainer.steps_per_epoch else None
        self.latest = {"step": trainer.step, "epoch": epochs, **{k: float(v) for k, v in metrics.items()}}
        self._consider("model", "", unwrap_model(trainer.model), metrics, trainer.step, epochs)
        if self.ema is not None:
            self._consider("ema", "ema_", self.ema.module, metrics, trainer.step, epochs)

    def _consider(self, which: str, prefix: str, model: nn.Module, metrics, step: int, epochs) -> None:
        from evamim.tasks.runner import full_weights

        record = {key: float(metrics[prefix + key]) for key in ("top1", "top5", "loss")}
        best = self.best[which]
        if best and record["top1"] <= best["top1"]:
            return  # the metrics are all-reduced: every process decides alike
        directory = self.output_dir / ("best" if which == "model" else "best_ema")
        self.best[which] = {**record, "step": step, "epoch": epochs, "dir": str(directory)}
        model = full_weights(model, None, self.is_main_process)  # gathers an FSDP-sharded model (a collective)
        if self.is_main_process:
            from evamim.models.checkpoint import save_pretrained

            save_pretrained(model, directory)
            atomic.write_json(directory / "metrics.json", self.best[which])
            logger.info("new best %s top-1 %.2f at step %d -> %s", which, record["top1"], step, directory)

    def state_dict(self) -> dict:
        return {"latest": dict(self.latest), "best": {k: dict(v) for k, v in self.best.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.latest = dict(state["latest"])
        self.best = {k: dict(v) for k, v in state["best"].items()}


def summarize_evaluations(best: BestCheckpoints | None, with_ema: bool) -> dict[str, Any]:
    """``final`` / ``final_ema`` (the last evaluation) and ``best`` / ``best_ema`` records; None where absent."""
    latest = best.latest if best is not None else {}
    return {
        "final": _pick(latest, ""),
        "final_ema": _pick(latest, "ema_") if with_ema else None,
        "best": (best.best["model"] or None) if best is not None else None,
        "best_ema": (best.best["ema"] or None) if best is not None and with_ema else None,
    }


def _pick(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    """{top1, top5, loss, step} of one model from the latest evaluation record."""
    if not metrics:
        return None
    return {"top1": metrics[prefix + "top1"], "top5": metrics[prefix + "top5"], "loss": metrics[prefix + "loss"],
            "step": metrics["step"]}


def results_table(results: Mapping[str, Any]) -> str:
    """The console summary: top-1 / top-5 / loss of the final and best model and EMA."""
    rows = []
    for name in ("final", "final_ema", "best", "best_ema"):
        record = results.get(name)
        if record:
            rows.append({"weights": name, "top1": record["top1"], "top5": record["top5"], "loss": record["loss"],
                         "step": record["step"]})
    if not rows:
        loss = results.get("train_loss")
        return format_table([{"steps": results["steps"], "train_loss": float("nan") if loss is None else loss}])
    return format_table(rows, ["weights", "top1", "top5", "loss", "step"])
