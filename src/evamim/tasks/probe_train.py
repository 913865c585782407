"""Training a linear-probe grid on the engine's loop: the step (features from the frozen backbone or from cached
rows, then every head), the resumable loader over cached rows, the evaluation of every head, and handing the
cached features to every process.

Several processes train the heads data-parallel: each takes its share of every global batch, the heads'
BatchNorm normalises over the global batch (``engine.sync_batchnorm``) and DDP averages the gradients, so two
processes with half the batch each make the same steps as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evamim.engine import CheckpointConfig, Hook, LoopConfig, NonFiniteLossError, Trainer, TrainResult, unwrap_model
from evamim.engine.checkpoint import CheckpointError
from evamim.features.choices import FeatureRequest, compute_parts
from evamim.features.extract import FeatureSet
from evamim.tasks.probe_heads import FeatureTable, ProbeHeads, probe_optim_config, probe_optimizer, summarize

logger = logging.getLogger(__name__)

EVAL_ROWS = 4096
"""Validation rows per evaluation batch (no gradients are kept: the heads' memory is small)."""


# ------------------------------------------------------------------------------------------------ the step
def feature_choices(parts: Mapping[str, torch.Tensor], specs: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{spec: (B, D)}`` from the parts of one backbone forward (``block_cls`` (B, K, C), ``avg`` (B, C))."""
    rows = FeatureSet(parts.get("block_cls"), parts.get("avg"), None, torch.empty(0, dtype=torch.long), [])
    return {spec: rows.get(spec) for spec in dict.fromkeys(specs)}


class BackboneFeatures:
    """Augmented mode: images (B, 3, H, W) -> ``{spec: (B, D)}`` float32 from the frozen backbone, in eval mode,
    under ``no_grad`` and autocast at the backbone's ``dtype``. It is never wrapped and has no trained weight."""

    def __init__(self, backbone: nn.Module, request: FeatureRequest, specs: Sequence[str], device: torch.device,
                 dtype: torch.dtype):
        self.backbone, self.request, self.specs = backbone, request, list(specs)
        self.device, self.dtype = device, dtype

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.backbone.eval()
        with torch.no_grad(), autocast:
            parts = compute_parts(self.backbone, images, self.request)
        return feature_choices({name: value.float() for name, value in parts.items()}, self.specs)


class ProbeStep:
    """The loop's step: ``(heads, possibly DDP-wrapped; batch) -> {"loss", "loss/<head>" ...}``.

    ``batch``: ``{"images", "labels"}`` (augmented: ``features`` turns the images into rows) or
    ``{"features": {spec: (B, D)}, "labels"}`` (cached rows). The loss is the sum of the heads' cross entropies:
    heads share no parameter, so each gets exactly its own gradient. A head whose loss is not finite on any
    process is marked diverged (agreed on by every process) and leaves the sum for the rest of the run, with a
    zero gradient, so that the others keep training; the loop's own guard then only sees a non-finite loss when
    something outside the heads is wrong.
    """

    def __init__(self, heads: ProbeHeads, device: torch.device,
                 features: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None):
        self.heads = heads
        self.device = device
        self.features = features

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["labels"].to(self.device, non_blocking=True).long()
        if self.features is not None:
            features = self.features(batch["images"])
        else:
            features = {name: rows.to(self.device, non_blocking=True) for name, rows in batch["features"].items()}
        losses = [F.cross_entropy(logits.float(), labels) for logits in model(features)]
        healthy = self._healthy(torch.stack([loss.detach() for loss in losses]))
        kept = [loss for loss, ok in zip(losses, healthy) if ok]
        left = [p for head, ok in zip(self.heads.heads, healthy) if not ok for p in head.parameters()]
        output = {"loss": torch.stack(kept).sum() + _zero_with_gradient(left)}
        output.update({f"loss/{spec.name}": loss.detach() for spec, loss in zip(self.heads.grid, losses)})
        return output

    def _healthy(self, losses: torch.Tensor) -> list[bool]:
        bad = _on_any_process(~torch.isfinite(losses))
        new = bad & ~self.heads.diverged
        if bool(new.any()):
            names = [spec.name for spec, flag in zip(self.heads.grid, new.tolist()) if flag]
            logger.warning("head(s) %s diverged (non-finite loss): left out of training from here on",
                           ", ".join(names))
            self.heads.diverged |= bad
        healthy = (~self.heads.diverged).tolist()
        if not any(healthy):
            raise NonFiniteLossError("every head of the grid diverged (non-finite loss): lower probe.lrs, use a "
                                     "longer probe.warmup_epochs, and check the features for NaN/inf values")
        return healthy


class ResetDivergedHeads(Hook):
    """After every optimizer step, zero the weights of the heads marked diverged. A head that diverged through
    its weights (a LARS lr far too large makes them grow geometrically until they overflow) would otherwise
    keep non-finite weights, and the loop writes no checkpoint while any weight is not finite: the whole grid
    would lose its checkpoints for one head that is out of the race anyway."""

    def __init__(self, heads: ProbeHeads):
        self.heads = heads

    def on_step_end(self, trainer: Any, metrics: Mapping[str, Any], skipped: bool) -> None:
        if not bool(self.heads.diverged.any()):
            return
        with torch.no_grad():
            for head, diverged in zip(self.heads.heads, self.heads.diverged.tolist()):
                if diverged:
                    for param in head.parameters():
                        param.zero_()


def _zero_with_gradient(params: Sequence[torch.Tensor]) -> torch.Tensor | int:
    """A zero that depends on ``params`` with a zero gradient, even for non-finite values (``0 * inf`` would be
    NaN): DDP expects a gradient for every parameter at every step."""
    everything = [p.masked_fill(torch.ones((), dtype=torch.bool, device=p.device), 0.0).sum() for p in params]
    return torch.stack(everything).sum() if everything else 0


def _on_any_process(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (bool) or-ed over the processes (a collective when several run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    device = flags.device if dist.get_backend() == "nccl" else torch.device("cpu")
    values = flags.to(device, torch.uint8)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.to(flags.device).bool()


# ----------------------------------------------------------------------------------------- the cached rows
class RowBatches:
    """Precomputed mode: the training rows in batches, for the loop (resumable: see ``engine.data_cursor``).

    Each epoch is a permutation of the rows seeded by ``seed + epoch``, cut into global batches of
    ``batch_size x world_size`` rows (the last incomplete one is dropped); this process takes every
    ``world_size``-th row of each, from position ``rank``. The position is counted in global batches, so a
    checkpoint resumes exactly (also on another number of processes with the same global batch).
    """

    def __init__(self, table: FeatureTable, labels: torch.Tensor, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.table, self.batch_size, self.seed = table, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.labels = labels.long().to(table.index_device)
        if len(table) < self.global_batch:
            raise ValueError(f"{len(table)} training rows are fewer than one step's {self.global_batch} "
                             f"(probe.batch_size {batch_size} x {world_size} process(es)): lower probe.batch_size")
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.table) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.table), generator=generator)
        while self.position < len(self):
            start = self.position * self.global_batch
            index = order[start + self.rank : start + self.global_batch : self.world_size].to(self.table.index_device)
            self.position += 1
            yield {"features": self.table.rows(index), "labels": self.labels[index]}
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "rows": len(self.table),
                "global_batch": self.global_batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if (state["rows"], state["global_batch"]) != (len(self.table), self.global_batch):
            raise CheckpointError(
                f"the checkpoint was written for {state['rows']} training rows in steps of {state['global_batch']}; "
                f"this run has {len(self.table)} rows in steps of {self.global_batch}: resume with the same data and "
                "batch size, or use a new output_dir")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------- evaluation
class _RowChunks:
    """This process's validation rows in order, ``EVAL_ROWS`` at a time."""

    def __init__(self, table: FeatureTable, labels: torch.Tensor, rows: torch.Tensor, batch_size: int):
        self.table, self.labels, self.rows, self.batch_size = table, labels.long(), rows, batch_size

    def __iter__(self):
        for start in range(0, len(self.rows), self.batch_size):
            index = self.rows[start : start + self.batch_size]
            yield {"features": self.table.rows(index), "labels": self.labels[index]}


class ProbeEvaluation:
    """Top-1/top-5 of every head (an ``Evaluation`` for the runner: hit counts of this process's share of the
    validation rows, summed over processes). BatchNorm in eval mode (running statistics).

    ``finalize`` also ranks the heads: ``rows`` (one per head, diverged ones marked) and ``best`` hold the last
    evaluation's report.
    """

    def __init__(self, heads: ProbeHeads, table: FeatureTable, labels: torch.Tensor, rows: torch.Tensor,
                 batch_size: int = EVAL_ROWS):
        self.heads = heads
        self.loader = _RowChunks(table, labels, rows, batch_size)
        self.rows: list[dict[str, Any]] | None = None
        self.best: dict[str, Any] | None = None

    def score(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        heads = unwrap_model(model)  # no gradient to synchronise: the processes may score different row counts
        labels = batch["labels"].to(heads.diverged.device)
        features = {name: rows.to(labels.device) for name, rows in batch["features"].items()}
        top1, top5 = [], []
        for logits in heads(features):
            top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = top == labels.unsqueeze(-1)
            top1.append(hits[:, :1].any(dim=-1).sum())
            top5.append(hits.any(dim=-1).sum())
        return {"top1": torch.stack(top1).double().cpu(), "top5": torch.stack(top5).double().cpu(),
                "count": torch.tensor(float(labels.shape[0]), dtype=torch.float64)}

    def finalize(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
        count = float(sums.get("count", 0))
        if count == 0:
            raise RuntimeError("the validation set has no rows")
        scores = [{"top1": 100.0 * float(a) / count, "top5": 100.0 * float(b) / count}
                  for a, b in zip(sums["top1"], sums["top5"])]
        self.rows, self.best = summarize(self.heads, scores)
        # Every head's top-1 (what ranks them) and the best head's scores; ``rows`` has every head's top-5 too.
        metrics = {f"top1/{row['head']}": row["top1"] for row in self.rows}
        metrics.update(best_top1=self.best["top1"], best_top5=self.best["top5"])
        return metrics


def evaluate(evaluation: ProbeEvaluation) -> dict[str, float]:
    """One process's evaluation outside the runner (eval mode, no_grad; the training mode is restored)."""
    heads = evaluation.heads
    was_training = heads.training
    heads.eval()
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in evaluation.loader:
            for name, value in evaluation.score(heads, batch).items():
                sums[name] = sums[name] + value if name in sums else value
    heads.train(was_training)
    return evaluation.finalize(sums)


# ----------------------------------------------------------------------------------- one process, in memory
def fit_heads(heads: ProbeHeads, data: RowBatches, probe: Any, *, out_dir: str | Path | None = None,
              hooks: Sequence[Any] = ()) -> TrainResult:
    """Train ``heads`` on ``data`` for ``probe.epochs`` with the engine's loop, in this process (the Python API;
    ``evamim linprobe`` goes through the task runner). ``out_dir``: logs and the final checkpoint; None = a
    temporary directory, removed afterwards."""
    device = heads.diverged.device
    loop = LoopConfig(epochs=probe.epochs, progress_bar=False, tensorboard=False, log_every=len(data))
    with tempfile.TemporaryDirectory() if out_dir is None else contextlib.nullcontext(out_dir) as directory:
        trainer = Trainer(heads, ProbeStep(heads, device), data, probe_optimizer(heads, probe),
                          optim=probe_optim_config(probe), loop=loop, checkpoint=CheckpointConfig(every=0),
                          out_dir=directory, hooks=[ResetDivergedHeads(heads), *hooks])
        return trainer.train()


# --------------------------------------------------------------------------------- features on every process
def broadcast_feature_set(features: FeatureSet | None) -> FeatureSet:
    """The main process's feature set on every process (a collective when several run; the set itself
    otherwise). Other processes get the tensors (in host memory), row indices 0..N-1 and no paths."""
    import torch.distributed as dist

    from evamim.engine.distributed import broadcast_from_main

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return features
    names = ("block_cls", "avg", "labels")
    main = dist.get_rank() == 0
    shapes = broadcast_from_main(
        {name: (tuple(getattr(features, name).shape), getattr(features, name).dtype) for name in names
         if getattr(features, name) is not None} if main else None)
    tensors = {name: _broadcast_rows(getattr(features, name) if main else torch.empty(shape, dtype=dtype), main)
               for name, (shape, dtype) in shapes.items()}
    if main:
        return features
    length = next(iter(tensors.values())).shape[0]
    return FeatureSet(tensors.get("block_cls"), tensors.get("avg"), tensors.get("labels"), torch.arange(length), [])


def _broadcast_rows(tensor: torch.Tensor, main: bool) -> torch.Tensor:
    """Rank 0's rows into ``tensor`` on every process, in pieces of about ``GATHER_CHUNK_BYTES`` on the
    backend's device (no process stages the whole tensor on a GPU)."""
    import math

    import torch.distributed as dist

    from evamim.engine.distributed import GATHER_CHUNK_BYTES

    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    row_bytes = max(1, math.prod(tensor.shape[1:]) * tensor.element_size())
    chunk = max(1, GATHER_CHUNK_BYTES // row_bytes)
    for start in range(0, tensor.shape[0], chunk):
        piece = tensor[start : start + chunk].to(device).contiguous()
        dist.broadcast(piece, src=0)
        if not main:
            tensor[start : start + chunk] = piece.cpu()
    return tensor
