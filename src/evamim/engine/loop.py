"""The training loop shared by every task.

A task supplies the model, an objective ``step_fn(model, batch) -> {"loss": tensor, <metric>: ...}``,
the data (see :mod:`evamim.engine.data_cursor` for the position protocol), an optimizer and the configs;
:class:`Trainer` does the rest: lr schedule, mixed precision, gradient accumulation, clipping, skipping
non-finite steps, logging, evaluation, checkpoints and automatic resume.

Gradient accumulation splits each batch from the data into ``grad_accum_steps`` equal micro-batches
(:func:`~evamim.engine.batching.split_batch`). One data batch is one optimizer step whatever the
accumulation, so the step counter, the schedule, epochs and the saved data position mean the same thing
with and without it, and the configured batch size is the batch the optimizer sees.

Several processes (DDP, ZeRO-1, FSDP; see :mod:`evamim.engine.distributed`): every process runs the same
loop on its own batches; the strategy's wrapper averages the gradients. The main process writes logs, and
the logged metrics are averaged over processes first. How checkpoints are written (one file, or sharded
directories) is the ``checkpointer``'s business (:mod:`evamim.engine.checkpoint`).

``step`` is the number of optimizer steps attempted so far: a step skipped for a non-finite loss or
gradient still counts (its batch is consumed and the schedule moves on), so a run always ends at
``total_steps`` and a resumed run sees the same batches and learning rates at the same steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from evamim.engine.batching import infer_batch_size, split_batch
from evamim.engine.checkpoint import (
    CheckpointConfig,
    FileCheckpointer,
    any_checkpoints,
    capture_rng_state,
    check_plain,
    checkpoint_dir,
    restore_rng_state,
)
from evamim.engine.data_cursor import DataCursor
from evamim.engine.logging import MetricAverager, MetricsLogger, Throughput
from evamim.engine.modules import model_device, unwrap_model
from evamim.engine.optim import OptimConfig, set_hparams
from evamim.engine.precision import PRECISIONS, Precision
from evamim.engine.schedule import make_lr_schedule, make_weight_decay_schedule, resolve_warmup_steps

_log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any], Mapping[str, Any]]


@dataclass
class LoopConfig:
    """Length, precision and bookkeeping of a training run."""

    total_steps: int | None = None
    """Run length in optimizer steps; set this or ``epochs``."""
    epochs: float | None = None
    """Run length in epochs (needs a known epoch length: ``len(data)`` or ``steps_per_epoch``)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast; preferred where supported) or ``fp16`` (autocast + dynamic loss scaling)."""
    grad_accum_steps: int = 1
    """Split each data batch into this many micro-batches and sum their gradients (batch size must divide)."""
    compile: bool = False
    """``torch.compile`` the model's forward in place (applies to ``model(...)`` calls in the objective)."""
    max_nonfinite_in_a_row: int = 20
    """Stop the run after this many consecutive steps skipped for a non-finite loss or gradient norm (>= 1).
    The default leaves room for the fp16 loss scaler to back off from 2**16 after overflows."""
    log_every: int = 10
    """Write averaged metrics every this many steps (and at the last step)."""
    eval_every: int = 0
    """Call the evaluation function every this many steps (0 = only at the last step, if one is given)."""
    progress_bar: bool = True
    """Show a tqdm progress bar (main process only)."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""

    def __post_init__(self) -> None:
        # Checked when the config is built, so a bad value stops the run before any model exists.
        _validate_loop_config(self)


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns."""

    step: int
    epoch: int
    nonfinite_skipped: int
    stopped_early: bool
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged training record (without ``time``)."""
    data_totals: dict[str, int] = field(default_factory=dict)
    """The data's ``bad_sample_totals()`` summed over the processes (``samples_tried``, ``samples_bad``), when
    the data counts them (see :mod:`~evamim.engine.data_cursor`)."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class Hook:
    """Callbacks into the loop; override what you need. A hook with ``state_dict()``/``load_state_dict()``
    (e.g. an EMA of the weights) is saved in and restored from checkpoints."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After resume, before the first step of this process."""

    def on_step_end(self, trainer: Trainer, metrics: Mapping[str, torch.Tensor | float], skipped: bool) -> None:
        """After optimizer step ``trainer.step`` (already incremented); ``metrics`` are that step's values."""

    def on_eval(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        """After an evaluation at ``trainer.step``."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step and the final checkpoint (not called when the run raises)."""


@dataclass
class _StepOutcome:
    metrics: dict[str, torch.Tensor]
    skipped: bool
    lr: float
    weight_decay: float | None
    batch_size: int


class Trainer:
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
        _validate_loop_config(loop)
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
        self.all_gather = all_gather if all_gather is not None else _all_gather_object
        self.batch_size_fn = batch_size_fn or infer_batch_size
        self.checkpointer = checkpointer if checkpointer is not None else FileCheckpointer(
            unwrap_model(model), optimizer, is_main_process=is_main_process)
        self.reduce_metrics = reduce_metrics if reduce_metrics is not None else _all_reduce_mean

        self.cursor = DataCursor(data)
        self.steps_per_epoch = steps_per_epoch if steps_per_epoch is not None else _len_or_none(data)
        self.total_steps = _resolve_total_steps(loop, self.steps_per_epoch)
        warmup = resolve_warmup_steps(optim.warmup_steps, optim.warmup_epochs, self.steps_per_epoch)
        self.lr_schedule = make_lr_schedule(self.total_steps, optim.lr, optim.min_lr, warmup, optim.schedule,
                                            optim.poly_power)
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
            sync = contextlib.nullcontext() if index == count - 1 else _no_sync(self.model)
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
            return _full(torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.clip_grad)).detach().float()
        if _is_dtensor(params[0].grad):  # FSDP: each process holds shards; the norm needs all of them
            return _full(torch.nn.utils.get_total_norm([p.grad for p in params])).detach().float()
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
        """Run ``eval_fn`` in eval mode, log its metrics under ``eval/`` and call the hooks."""
        self.model.eval()
        try:
            with torch.no_grad(), self.precision.autocast():
                metrics = {key: float(value) for key, value in self.eval_fn(self.model).items()}
        finally:
            self.model.train()
        self._logger.log(self.step, {"epoch": self.cursor.epoch, **metrics}, prefix="eval")
        for hook in self.hooks:
            hook.on_eval(self, metrics)
        return metrics

    # ------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (see :mod:`evamim.engine.checkpoint`): the model and
        optimizer state from the checkpointer, and the loop's own state. With several processes a collective."""
        return {**self.checkpointer.model_optimizer_state(), **self._loop_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.checkpointer.load_model_optimizer_state(state)
        self._load_loop_state(state)

    def _loop_state(self) -> dict:
        """The checkpoint without the model and optimizer (a collective with several processes)."""
        return {
            "scaler": self.precision.state_dict(),
            "per_rank": self._gather_per_rank_state(),
            "trainer": {"nonfinite_skipped": self.nonfinite_skipped, "nonfinite_in_a_row": self.nonfinite_in_a_row},
            "hooks": {name: hook.state_dict() for name, hook in self._stateful_hooks().items()},
            "config": self.config,
        }

    def _load_loop_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_loop_state` saved; the model and optimizer are already restored."""
        self.precision.load_state_dict(state["scaler"])
        own = self._own_rank_state(state["per_rank"])
        self.cursor.load_state_dict(own["data"])
        self.nonfinite_skipped = int(state["trainer"]["nonfinite_skipped"])
        self.nonfinite_in_a_row = int(state["trainer"]["nonfinite_in_a_row"])
        self._load_hooks(state["hooks"])
        _log_config_changes(state["config"], self.config)
        self.step = int(state["step"])
        restore_rng_state(own["rng"])  # last: nothing above may draw random numbers after it

    def _gather_per_rank_state(self) -> list[dict]:
        """``[{"rng": ..., "data": ...} for each rank]``: RNG streams and (for sharded data) positions differ
        per process. A collective when ``world_size > 1``: every process must call it."""
        local = {"rng": capture_rng_state(), "data": self.cursor.state_dict()}
        if self.world_size == 1:
            return [local]
        gathered = list(self.all_gather(local))
        if len(gathered) != self.world_size:
            raise RuntimeError(f"all_gather returned {len(gathered)} states for world_size={self.world_size}")
        return gathered

    def _own_rank_state(self, per_rank: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        if len(per_rank) == self.world_size:
            return per_rank[self.rank]
        _log.warning(
            "the checkpoint was written by %d processes and this run has %d: process %d takes the RNG state and "
            "data position of process %d (the data decides whether that position still applies), so the run "
            "continues but is not the same as an uninterrupted one", len(per_rank), self.world_size, self.rank,
            self.rank % len(per_rank))
        return per_rank[self.rank % len(per_rank)]

    def _stateful_hooks(self) -> dict[str, Hook]:
        return {f"{index}:{type(hook).__name__}": hook for index, hook in enumerate(self.hooks)
                if callable(getattr(hook, "state_dict", None)) and callable(getattr(hook, "load_state_dict", None))}

    def _load_hooks(self, saved: Mapping[str, Any]) -> None:
        for name, hook in self._stateful_hooks().items():
            if name not in saved:
                _log.warning("hook %s has no state in the checkpoint; it starts fresh", name)
                continue
            hook.load_state_dict(saved[name])
        for name in set(saved) - set(self._stateful_hooks()):
            _log.warning("the checkpoint holds state for hook %s, which this run does not have; it is ignored", name)

    def _save_when_healthy(self, final: bool) -> None:
        """Write the due checkpoint unless the run is in a streak of non-finite steps or its weights are not
        finite: then it is postponed to the first healthy step (the weights are unchanged by skipped steps), so
        a diverging run never rotates its last healthy checkpoints out for poisoned ones (``keep_last``)."""
        weights_finite = self._on_every_process(self._weights_finite())
        if self.unhealthy_in_a_row == 0 and weights_finite:
            self._checkpoint_due = self._checkpoint_postponed = False
            self.save()
            return
        reason = ("its weights are not finite" if not weights_finite else
                  f"the last {self.unhealthy_in_a_row} steps had a non-finite loss or gradient norm")
        keep = f"the last checkpoint stays {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        if final:
            _log.warning("step %d: no final checkpoint: %s (%s)", self.step, reason, keep)
        elif not self._checkpoint_postponed:  # once per postponement, not at every step of a streak
            _log.warning("step %d: checkpoint postponed to the next healthy step: %s (%s)", self.step, reason, keep)
            self._checkpoint_postponed = True

    def _data_totals(self) -> dict[str, int]:
        """The data's bad-sample counters summed over the processes (a collective with several); {} if it has none."""
        counters = getattr(self.cursor.data, "bad_sample_totals", None)
        if not callable(counters):
            return {}
        local = {key: float(value) for key, value in counters().items()}
        if self.world_size > 1:
            local = {key: mean * self.world_size for key, mean in self.reduce_metrics(local).items()}
        return {key: int(round(value)) for key, value in local.items()}

    def _weights_finite(self) -> bool:
        """True when every parameter this process holds (its shards under FSDP) is finite."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        local = [p.to_local() if _is_dtensor(p) else p for p in params]
        return bool(torch.stack([torch.isfinite(p.detach()).all() for p in local]).all()) if local else True

    def _on_every_process(self, flag: bool) -> bool:
        """``flag`` and-ed over the processes (a collective with several: every process must call it)."""
        if self.world_size == 1:
            return flag
        return self.reduce_metrics({"flag": float(flag)})["flag"] == 1.0

    def save(self) -> Path | None:
        """Write a checkpoint for the current step; every process must call it (the per-process state is
        gathered), the main process writes it. Returns its path (None on the other processes)."""
        self._saved_step = self.step
        path = self.checkpointer.save(checkpoint_dir(self.out_dir), self.step, self.ckpt_cfg.keep_last,
                                      self._loop_state())
        if self.is_main_process:
            self.last_checkpoint = path
        if self.world_size > 1:
            self.all_gather(None)  # a barrier: no process reads checkpoints/ before the write is complete
        return path

    def resume(self) -> Path | None:
        """Restore from the checkpoint selected by ``checkpoint.resume``; returns its path (None = fresh start).

        :meth:`train` calls this unless it was called already."""
        self._resumed = True
        mode = self.ckpt_cfg.resume
        directory = checkpoint_dir(self.out_dir)
        if mode == "never":
            existing = any_checkpoints(directory)
            if existing:
                raise FileExistsError(
                    f"checkpoint.resume=never but {directory} already holds {len(existing)} checkpoints; use a new "
                    "output directory, or checkpoint.resume=auto to continue that run")
            return None
        if mode == "auto":
            found = self.checkpointer.load_latest(directory)
            if found is None:
                _log.info("no checkpoint in %s: starting at step 0", directory)
                return None
            path, state = found
        else:
            path = Path(mode)
            state = self.checkpointer.load(path)
        self._load_loop_state(state)
        self.last_checkpoint = path
        self._saved_step = self.step
        _log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.cursor.epoch)
        return path


# ---------------------------------------------------------------------------------------------- helpers


def _all_gather_object(obj: Any) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 but torch.distributed is not initialised; initialise the process group "
                           "first or pass all_gather to the Trainer")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    from evamim.engine.distributed import all_reduce_mean

    return all_reduce_mean(values)


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Skip the gradient synchronisation of this backward: DDP's ``no_sync()``, FSDP2's
    ``set_requires_gradient_sync(False)``; nothing for an unwrapped model."""
    no_sync = getattr(model, "no_sync", None)
    if callable(no_sync):
        return no_sync()
    from evamim.engine.distributed import fsdp_no_sync, is_fsdp

    return fsdp_no_sync(model) if is_fsdp(model) else contextlib.nullcontext()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return callable(getattr(tensor, "full_tensor", None))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as a plain tensor (a collective for sharded or partial ones); others as they are."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


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


def _len_or_none(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:  # iterables without __len__ (streaming data): the epoch length is unknown
        return None


def _resolve_total_steps(cfg: LoopConfig, steps_per_epoch: int | None) -> int:
    if (cfg.total_steps is None) == (cfg.epochs is None):
        raise ValueError(f"set exactly one of loop.total_steps ({cfg.total_steps}) and loop.epochs ({cfg.epochs})")
    if cfg.total_steps is not None:
        if cfg.total_steps < 1:
            raise ValueError(f"loop.total_steps must be >= 1, got {cfg.total_steps}")
        return int(cfg.total_steps)
    if steps_per_epoch is None:
        raise ValueError(f"loop.epochs={cfg.epochs} needs the epoch length, but the data has no len(); "
                         "pass steps_per_epoch or set loop.total_steps")
    total = int(round(cfg.epochs * steps_per_epoch))
    if total < 1:
        raise ValueError(f"loop.epochs={cfg.epochs} x {steps_per_epoch} steps per epoch is less than one step")
    return total


def _validate_loop_config(cfg: LoopConfig) -> None:
    if (cfg.total_steps is None) == (cfg.epochs is None):
        hint = ("set loop.epochs=null to run by steps, or loop.total_steps=null to run by epochs"
                if cfg.total_steps is not None else "set one of them")
        raise ValueError(f"set exactly one of loop.total_steps ({cfg.total_steps}) and loop.epochs ({cfg.epochs}): "
                         f"{hint}")
    if cfg.total_steps is not None and cfg.total_steps < 1:
        raise ValueError(f"loop.total_steps must be >= 1, got {cfg.total_steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise ValueError(f"loop.epochs must be > 0, got {cfg.epochs}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"loop.precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    for name in ("grad_accum_steps", "max_nonfinite_in_a_row", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"loop.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every < 0:
        raise ValueError(f"loop.eval_every must be >= 0, got {cfg.eval_every}")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _log_config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Resuming with a changed config is legitimate (e.g. more steps, bf16 instead of fp16) but worth a line."""
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key, "<unset>") != new.get(key, "<unset>"))
    if changed:
        shown = ", ".join(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}" for key in changed[:10])
        more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
        _log.warning("resuming with a config that differs from the checkpoint's: %s%s", shown, more)
