"""The :class:`Trainer`: the training loop shared by every task.

A task supplies the model, an objective ``step_fn(model, batch) -> {"loss": tensor, <metric>: ...}``,
the data (see :mod:`evamim.engine.data_cursor` for the position protocol), an optimizer and the configs;
the Trainer does the rest: lr schedule, mixed precision, gradient accumulation, clipping, skipping
non-finite steps, logging, evaluation, checkpoints and automatic resume (the last two in
:mod:`~evamim.engine.loop.state`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from evamim.engine.batching import infer_batch_size, split_batch
from evamim.engine.checkpoint import CheckpointConfig, FileCheckpointer, check_plain
from evamim.engine.data_cursor import DataCursor
from evamim.engine.logging import MetricAverager, MetricsLogger, Throughput
from evamim.engine.loop.config import (
    Hook,
    LoopConfig,
    NonFiniteLossError,
    StepFn,
    TrainResult,
    len_or_none,
    resolve_total_steps,
    validate_loop_config,
)
from evamim.engine.loop.parallel import all_gather_object, all_reduce_mean, full_tensor, is_dtensor, no_sync
from evamim.engine.loop.state import TrainerCheckpointing
from evamim.engine.modules import model_device, unwrap_model
from evamim.engine.optim import OptimConfig, set_hparams
from evamim.engine.precision import Precision
from evamim.engine.progress import format_eval_line
from evamim.engine.schedule import make_lr_schedule, make_weight_decay_schedule, resolve_warmup_steps

# Every loop message shares one logger name, so one filter covers them.
_log = logging.getLogger("evamim.engine.loop")


@dataclass
class _StepOutcome:
    metrics: dict[str, torch.Tensor]
    skipped: bool
    lr: float
    weight_decay: float | None
    batch_size: int


class Trainer(TrainerCheckpointing):
    """Runs ``step_fn`` over ``data`` with ``optimizer`` until ``total_steps``, resuming from ``out_dir``.

    Args:
        model: the module to train; may be wrapped by DDP or sharded by FSDP2 (checkpoints store the
            unwrapped ``state_dict``, or what ``checkpointer`` says).
        step_fn: ``(model, batch) -> dict`` with a scalar ``loss`` tensor to minimise (a mean over the
            batch, so accumulation over equal micro-batches matches the full batch) and any other scalar
            metrics (tensors or floats); every entry is averaged over the log interval and logged.
            Runs under autocast.
        data: an iterable of batches, one batch per optimizer step (see :mod:`~evamim.engine.data_cursor`).
        optimizer: e.g. from :func:`~evamim.engine.optim.build_optimizer`; its groups' lr (and weight decay
            when scheduled) are set from ``optim`` before every step, times each group's ``lr_scale``.
        optim: schedule, weight decay schedule and gradient clipping settings.
        loop / checkpoint: see :class:`LoopConfig`, :class:`~evamim.engine.checkpoint.CheckpointConfig`.
        out_dir: where metrics.jsonl, tensorboard/ and checkpoints/ go.
        steps_per_epoch: epoch length in steps, if ``len(data)`` is not it (or not defined).
        hooks: :class:`Hook` instances, called in order.
        eval_fn: ``model -> dict[str, float]``, run in eval mode under ``no_grad`` and autocast every
            ``loop.eval_every`` steps and at the last step; logged with the ``eval/`` prefix.
        config: the run's resolved config as a plain dict, stored in checkpoints (a resume with a different
            config is allowed and the differences are logged).
        is_main_process: only the main process writes logs and checkpoints.
        rank / world_size: this process's index and the number of processes, each training on its own
            batches (world_size scales img/s). With several processes every checkpoint holds each
            process's RNG state and data position, collected with ``all_gather``.
        all_gather: ``obj -> [obj of rank 0, obj of rank 1, ...]``, a collective every process calls
            (default with world_size > 1: ``torch.distributed.all_gather_object``).
        batch_size_fn: ``batch -> int``, if the batch size cannot be inferred from the batch's tensors.
        checkpointer: writes and restores the model and optimizer state
            (:class:`~evamim.engine.checkpoint.FileCheckpointer` of the unwrapped model by default;
            :class:`~evamim.engine.checkpoint.ShardedCheckpointer` for FSDP).
        reduce_metrics: ``dict[str, float] -> dict[str, float]``, a collective every process calls at each
            log step with its averaged metrics (default with world_size > 1: the mean over processes).
    """

    def __init__(
        self,
        model: nn.Module,
        step_fn: StepFn,
        data: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        optim: OptimConfig,
        loop: LoopConfig,
        checkpoint: CheckpointConfig,
        out_dir: str | os.PathLike,
        steps_per_epoch: int | None = None,
        hooks: Sequence[Hook] = (),
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        config: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        rank: int = 0,
        world_size: int = 1,
        all_gather: Callable[[Any], list] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        checkpointer: Any = None,
        reduce_metrics: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
    ):
        validate_loop_config(loop)
        self.model = model
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.optim_cfg = optim
        self.loop_cfg = loop
        self.ckpt_cfg = checkpoint
        self.out_dir = Path(out_dir)
        self.hooks = list(hooks)
        self.eval_fn = eval_fn
        self.config = dict(config) if config is not None else {}
        self.is_main_process = is_main_process
        self.rank = rank
        self.world_size = world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.all_gather = all_gather if all_gather is not None else all_gather_object
        self.batch_size_fn = batch_size_fn or infer_batch_size
        self.checkpointer = checkpointer if checkpointer is not None else FileCheckpointer(
            unwrap_model(model), optimizer, is_main_process=is_main_process)
        self.reduce_metrics = reduce_metrics if reduce_metrics is not None else all_reduce_mean

        self.cursor = DataCursor(data)
        self.steps_per_epoch = steps_per_epoch if steps_per_epoch is not None else len_or_none(data)
        self.total_steps = resolve_total_steps(loop, self.steps_per_epoch)
        warmup = resolve_warmup_steps(optim.warmup_steps, optim.warmup_epochs, self.steps_per_epoch)
        self.lr_schedule = make_lr_schedule(self.total_steps, optim.lr, optim.min_lr, warmup, optim.schedule,
                                            optim.poly_power, optim.milestones, optim.gamma)
        self.wd_schedule = (make_weight_decay_schedule(self.total_steps, optim.weight_decay, optim.weight_decay_end)
                            if optim.weight_decay_end is not None else None)
        self.precision = Precision(loop.precision, model_device(model).type)

        self.step = 0
        self.nonfinite_skipped = 0
        self.nonfinite_in_a_row = 0
        self.unhealthy_in_a_row = 0
        """Skipped steps in a row that were not routine fp16 overflows (a non-finite loss, or non-finite gradients
        without a loss scaler): while it is > 0 the run may be diverging and no checkpoint is written."""
        self._checkpoint_due = False
        self._checkpoint_postponed = False
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._stop_requested = False
        self._resumed = False
        self._last_record: dict[str, float] = {}
        self._averager = MetricAverager()
        self._throughput = Throughput()
        self._logger: MetricsLogger | None = None

    # ------------------------------------------------------------------------------------ public

    def train(self) -> TrainResult:
        """Resume if there is a checkpoint, train to ``total_steps`` (or until :meth:`request_stop`), save."""
        if not self._resumed:
            self.resume()
        # Fail now, not at the first checkpoint hours later, if these cannot be stored loadably.
        check_plain(self.config, "config")
        check_plain(self.cursor.state_dict(), "data state")
        if self.loop_cfg.compile:
            self.model.compile()
        self._logger = MetricsLogger(self.out_dir, is_main_process=self.is_main_process,
                                     total_steps=self.total_steps, start_step=self.step,
                                     tensorboard=self.loop_cfg.tensorboard, progress_bar=self.loop_cfg.progress_bar)
        try:
            self._run()
        finally:
            self._logger.close()
        for hook in self.hooks:
            hook.on_train_end(self)
        return TrainResult(self.step, self.cursor.epoch, self.nonfinite_skipped, self._stop_requested,
                           self.last_checkpoint, {k: v for k, v in self._last_record.items() if k != "time"},
                           self._data_totals())

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from :meth:`train` (e.g. from a hook)."""
        self._stop_requested = True

    # ------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        if self.step >= self.total_steps:
            _log.info("nothing to do: the run is at step %d of %d", self.step, self.total_steps)
            return
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for hook in self.hooks:
            hook.on_train_start(self)
        self._throughput = Throughput()
        while self.step < self.total_steps and not self._stop_requested:
            batch = self.cursor.next()
            outcome = self.train_step(batch)
            self.step += 1
            self._after_step(outcome)  # saves at the last step and when a stop was requested

    def train_step(self, batch: Any) -> _StepOutcome:
        """One optimizer step on ``batch``: forward/backward over its micro-batches, clip, step or skip."""
        lr = self.lr_schedule(self.step)
        weight_decay = self.wd_schedule(self.step) if self.wd_schedule is not None else None
        set_hparams(self.optimizer, lr, weight_decay)
        metrics = self._accumulate_gradients(batch)
        metrics["grad_norm"] = self._unscale_and_clip()
        # Under DDP the norm is taken over all-reduced gradients, so a NaN loss on one rank (whose NaN
        # gradients reach every rank) makes all ranks skip together and the replicas stay identical.
        skipped = not bool(torch.isfinite(metrics["loss"]) & torch.isfinite(metrics["grad_norm"]))
        if skipped:
            self._skip_step(metrics)
        else:
            self.precision.step(self.optimizer)
            self.nonfinite_in_a_row = 0
            self.unhealthy_in_a_row = 0
        self.precision.update()
        self.optimizer.zero_grad(set_to_none=True)
        return _StepOutcome(metrics, skipped, lr, weight_decay, self.batch_size_fn(batch))

    def _accumulate_gradients(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward and backward over the micro-batches; returns the objective's entries averaged over them."""
        micro_batches = split_batch(batch, self.loop_cfg.grad_accum_steps)
        count = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for index, micro_batch in enumerate(micro_batches):
            # DDP all-reduces gradients on every backward; only the last micro-batch's needs to.
            sync = contextlib.nullcontext() if index == count - 1 else no_sync(self.model)
            with sync:
                with self.precision.autocast():
                    output = self.step_fn(self.model, micro_batch)
                loss = _check_output(output)
                # Mean over micro-batches: equal-size micro-batches then give the full batch's gradient.
                self.precision.backward(loss / count)
            for key, value in output.items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                sums[key] = sums[key] + value if key in sums else value
        return {key: value / count for key, value in sums.items()}

    def _unscale_and_clip(self) -> torch.Tensor:
        """Total L2 gradient norm before clipping (clipped to ``optim.clip_grad`` unless that is None or 0)."""
        self.precision.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return torch.zeros(())
        if self.optim_cfg.clip_grad:
            return full_tensor(torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.clip_grad)).detach().float()
        if is_dtensor(params[0].grad):  # FSDP: each process holds shards; the norm needs all of them
            return full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params])).detach().float()
        norms = torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])
        return torch.linalg.vector_norm(norms)

    def _skip_step(self, metrics: Mapping[str, torch.Tensor]) -> None:
        """Leave the weights and optimizer state untouched; count, and stop after too many in a row."""
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        # Every process skips together (the gradient norm is global) but each has its own loss: decide together.
        routine_overflow = self.precision.scaler is not None and self._on_every_process(math.isfinite(loss))
        if not routine_overflow:
            self.unhealthy_in_a_row += 1
        if routine_overflow:
            # In fp16 an overflowing gradient is routine: the scaler halves the scale in update().
            _log.info("step %d: fp16 gradient overflow at loss scale %g; step skipped", self.step + 1,
                      self.precision.loss_scale)
        else:
            _log.warning("step %d skipped: loss=%s grad_norm=%s (%d in a row, %d in total)", self.step + 1, loss,
                         grad_norm, self.nonfinite_in_a_row, self.nonfinite_skipped)
        if self.nonfinite_in_a_row >= self.loop_cfg.max_nonfinite_in_a_row:
            raise NonFiniteLossError(self._nonfinite_message(loss, grad_norm))

    def _nonfinite_message(self, loss: float, grad_norm: float) -> str:
        scale = f", fp16 loss scale {self.precision.loss_scale:g}" if self.precision.scaler is not None else ""
        resume_from = (f"The last checkpoint is {self.last_checkpoint}." if self.last_checkpoint is not None
                       else "No checkpoint was written by this run.")
        return (
            f"stopping at step {self.step + 1}: {self.nonfinite_in_a_row} optimizer steps in a row had a non-finite "
            f"loss or gradient norm (last: loss={loss}, grad_norm={grad_norm}{scale}); they were skipped, not "
            "trained on. Things to try: a lower learning rate (optim.lr); a longer warmup (optim.warmup_steps or "
            "optim.warmup_epochs); gradient clipping (optim.clip_grad, e.g. 3.0); precision=bf16 instead of fp16; "
            f"and check the data for NaN/inf values or corrupt samples. {resume_from}"
        )

    # ------------------------------------------------------------------------------------ after a step

    def _after_step(self, outcome: _StepOutcome) -> None:
        """Logging, hooks, evaluation and checkpoint for the step just taken, in that order: hooks run before
        the evaluation so that what they maintain (an EMA of the weights) includes this step, and the
        checkpoint comes last so it captures the RNG state the next step starts from."""
        if not outcome.skipped:
            self._averager.add(outcome.metrics)
        self._throughput.add(outcome.batch_size * self.world_size)
        self._logger.advance()
        last = self.step >= self.total_steps
        if last or self.step % self.loop_cfg.log_every == 0:
            self._log_train(outcome)
        for hook in self.hooks:
            hook.on_step_end(self, outcome.metrics, outcome.skipped)
        if self.eval_fn is not None and (last or (self.loop_cfg.eval_every and self.step % self.loop_cfg.eval_every == 0)):
            self.evaluate()
        every = self.ckpt_cfg.every
        if last or self._stop_requested or (every and self.step % every == 0):
            self._checkpoint_due = True
        if self._checkpoint_due:
            self._save_when_healthy(final=last or self._stop_requested)

    def _log_train(self, outcome: _StepOutcome) -> None:
        metrics = self._averager.compute()
        if self.world_size > 1:
            # Every process computed its metrics on its own batches: log their mean (a collective).
            metrics = dict(self.reduce_metrics(metrics))
        data_totals = self._data_totals()
        if not self.is_main_process:
            return
        record: dict[str, float] = {"epoch": self.cursor.epoch, "lr": outcome.lr}
        if outcome.weight_decay is not None:
            record["weight_decay"] = outcome.weight_decay
        record.update(metrics)
        record.update(self._throughput.compute())
        record["nonfinite_skipped"] = self.nonfinite_skipped
        record.update(data_totals)
        if self.precision.loss_scale is not None:
            record["loss_scale"] = self.precision.loss_scale
        self._logger.log(self.step, record)
        self._last_record = record

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` in eval mode, log its metrics under ``eval/`` (and as one line on the console of the
        main process) and call the hooks."""
        self.model.eval()
        try:
            with torch.no_grad(), self.precision.autocast():
                metrics = {key: float(value) for key, value in self.eval_fn(self.model).items()}
        finally:
            self.model.train()
        self._logger.log(self.step, {"epoch": self.cursor.epoch, **metrics}, prefix="eval")
        if self.is_main_process:
            _log.info("%s", format_eval_line(self.step, metrics, epoch=self.cursor.epoch))
        for hook in self.hooks:
            hook.on_eval(self, metrics)
        return metrics


def _check_output(output: Any) -> torch.Tensor:
    """The objective's loss, after checking the output is a dict of scalars with a differentiable ``loss``."""
    if not isinstance(output, Mapping) or "loss" not in output:
        raise TypeError(f"step_fn must return a dict with a 'loss' entry, got {type(output).__name__}"
                        + (f" with keys {sorted(output)}" if isinstance(output, Mapping) else ""))
    loss = output["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise TypeError("step_fn's 'loss' must be a scalar tensor that requires grad "
                        f"(got {type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}'})")
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise TypeError(f"step_fn's entry {key!r} has shape {tuple(value.shape)}; every entry must be a scalar")
        if not isinstance(value, (torch.Tensor, int, float)):
            raise TypeError(f"step_fn's entry {key!r} is a {type(value).__name__}; entries must be scalars")
    return loss.reshape(())
