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

Modules: :mod:`~evamim.engine.loop.config` (:class:`LoopConfig`, :class:`Hook`, :class:`TrainResult`,
:class:`NonFiniteLossError`), :mod:`~evamim.engine.loop.trainer` (:class:`Trainer`: the steps, logging and
evaluation), :mod:`~evamim.engine.loop.state` (the Trainer's checkpoint and resume), and
:mod:`~evamim.engine.loop.parallel` (what the loop needs from several processes).
"""

from evamim.engine.loop.config import Hook, LoopConfig, NonFiniteLossError, StepFn, TrainResult
from evamim.engine.loop.trainer import Trainer

__all__ = ["Hook", "LoopConfig", "NonFiniteLossError", "StepFn", "TrainResult", "Trainer"]
