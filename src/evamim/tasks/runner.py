"""The task runner: the one place where a task meets processes, devices, wrappers, checkpoints and logs.

A training task (pretrain, finetune, segment, linprobe, ...) supplies only what is its own, as a
:class:`TrainingTask`: its checks, and a ``build`` that returns :class:`TrainingParts` (the module to train,
the step function with any frozen parts inside it, the data, the evaluation, hooks, export). The runner:

1. validates the config (the task's checks and the batch arithmetic of :mod:`evamim.tasks.batching`),
2. joins the process group the launcher describes (torchrun, SLURM) and places the device,
3. seeds (the same initial weights on every process, then ``seed + rank`` for training draws),
4. writes ``output_dir/config.yaml`` (main process),
5. asks the task for its parts, wraps the trained module for ``distributed.strategy`` (ddp / zero1 / fsdp)
   and builds its optimizer (ZeRO-1 shards the optimizer state), and picks the checkpointer (sharded for FSDP),
6. runs the shared :class:`~evamim.engine.Trainer` (checkpoints, exact resume, the non-finite guard, logs),
   with the task's evaluation summed over every process's share of the validation set (:class:`Evaluation`),
   or its records gathered from every process (:class:`GatheredEvaluation`),
7. exports the full weights through the task (an FSDP model is gathered first) and writes
   ``summary.json`` with the task's results, including the last validation metrics,
8. leaves the process group.

docs/tasks.md describes the contract with an example. Knn and embed do not train: they join the process group
through :func:`evaluation_process` and share the data sharding of the loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the contract
@dataclass(frozen=True)
class RunContext:
    """What a task may know about the run while it builds its parts."""

    device: torch.device
    rank: int
    world_size: int
    is_main_process: bool
    output_dir: Path
    batch_size: int
    """Images per process and optimizer step (all micro-batches together): what the training loader yields."""
    grad_accum_steps: int
    """Micro-batches per optimizer step."""


class Evaluation(Protocol):
    """A validation metric that sums over samples, so that several processes give the one-process result.

    The runner iterates ``loader`` (this process's share of the validation set, unpadded: every sample is
    scored once over all processes), adds up ``score(model, batch)`` (named float64 sums of this batch),
    all-reduces the sums over processes and calls ``finalize(sums) -> {metric: value}``. ``model`` is in eval
    mode, under ``no_grad`` and the training precision.
    """

    loader: Iterable

    def score(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]: ...

    def finalize(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]: ...


class GatheredEvaluation(Protocol):
    """A validation metric that needs every prediction at once (COCO AP ranks all detections of the set), so it
    cannot be a sum: marked by ``gathered = True``.

    The runner iterates ``loader`` (this process's share, unpadded), concatenates ``collect(model, batch)``
    (picklable records, e.g. COCO detections), gathers every process's records (in rank order) and calls
    ``finalize(records) -> {metric: value}`` on every process with all of them: the one-process result.
    """

    loader: Iterable
    gathered: bool

    def collect(self, model: nn.Module, batch: Any) -> list[Any]: ...

    def finalize(self, records: Sequence[Any]) -> dict[str, float]: ...


@dataclass
class TrainingParts:
    """What a task builds for the runner (on ``RunContext.device``)."""

    model: nn.Module
    """The module the strategy wraps: the step calls it, so its ``forward`` must run everything that needs
    gradients (DDP / FSDP only see computations that go through it)."""
    step: Callable[[nn.Module, Any], Mapping[str, Any]]
    """``(wrapped model, batch) -> {"loss": scalar, other metrics}``; frozen parts (a teacher, a probe's
    backbone) live inside it, never wrapped. Runs under autocast."""
    data: Any
    """The training loader (resumable: ``state_dict`` / ``load_state_dict``), batches of ``RunContext.batch_size``."""
    weights: nn.Module | None = None
    """The module whose parameters are trained, checkpointed and exported, inside ``model`` (e.g. the student
    inside the pre-training objective module); None = ``model``."""
    param_groups: list[dict] | Callable[[nn.Module], list[dict]] | None = None
    """Optimizer groups; None = ``engine.param_groups(model, optim.weight_decay, optim.layer_decay)``. A callable
    ``(weights) -> groups`` is called after wrapping: FSDP replaces the parameters, so a list built before would
    hold parameters that no longer train (a list is refused under FSDP)."""
    shard_units: Sequence[nn.Module] = ()
    """The submodules FSDP shards one by one (the transformer blocks)."""
    sync_buffers: bool = False
    """DDP re-broadcasts buffers before each forward: only for running statistics that must agree."""
    evaluation: Evaluation | GatheredEvaluation | None = None
    hooks: Sequence[Any] = ()
    """``engine.Hook`` instances (EMA, best-model export, ...)."""
    steps_per_epoch: int | None = None
    """When ``len(data)`` is not the epoch length."""
    loop_updates: dict[str, Any] = field(default_factory=dict)
    """Derived ``LoopConfig`` fields (e.g. ``eval_every`` from epochs); the config itself is not changed."""
    export: Callable[[nn.Module, Path], Mapping[str, Any]] | None = None
    """``(full unwrapped model, output_dir) -> results entries``; called on the main process only."""
    skeleton: Callable[[], nn.Module] | None = None
    """Builds a weightless copy of ``model`` (on the meta device) for exporting an FSDP-sharded one; None =
    ``type(model)(model.config)``."""


class TrainingTask(Protocol):
    """A task for :func:`run_training`. The config has ``output_dir``, ``seed``, ``device``, ``batch_size``,
    ``global_batch_size``, ``optim``, ``loop``, ``checkpoint`` and ``distributed``."""

    name: str

    def validate(self, config: Any) -> None:
        """Raise ConfigError listing everything that would fail later, before anything is built."""

    def build(self, config: Any, context: RunContext) -> TrainingParts: ...

    def results(self, config: Any, result: Any, parts: TrainingParts) -> dict[str, Any]:
        """The task's entries of ``summary.json`` (the runner adds steps, data, evaluation and exports)."""


# ------------------------------------------------------------------------------------------------ the run
def run_training(task: TrainingTask, config: Any, hooks: Sequence[Any] = ()) -> dict[str, Any]:
    """Validate, join the processes, build, train, evaluate, export; returns the summary (every process).

    Re-running with the same ``output_dir`` resumes from the newest checkpoint that loads. Under torchrun or
    srun this joins the other processes first and leaves the group after a clean finish; a group the caller
    initialised is used as it is.
    """
    from evamim.config import ConfigError
    from evamim.engine.distributed import destroy_distributed, init_distributed
    from evamim.tasks.batching import batch_plan

    task.validate(config)
    try:
        state = init_distributed(config.distributed, config.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    plan = batch_plan(config, state.world_size)
    summary = _train(task, config, state, plan, hooks)
    # Only after a clean finish: leaving the group is itself a handshake, and after an error the other
    # processes may sit in a collective; the CLI then ends the process with the error instead.
    destroy_distributed(state)
    return summary


def _train(task: TrainingTask, config: Any, state: Any, plan: Any, hooks: Sequence[Any]) -> dict[str, Any]:
    from evamim.config import save_config, to_dict
    from evamim.engine import Trainer
    from evamim.engine.checkpoint import FileCheckpointer, ShardedCheckpointer
    from evamim.engine.distributed import wrap_model

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        save_config(config, output_dir / "config.yaml")
    seed_everything(config.seed)  # the same initial weights on every process
    context = RunContext(device=state.device, rank=state.rank, world_size=state.world_size,
                         is_main_process=state.is_main_process, output_dir=output_dir,
                         batch_size=plan.per_process, grad_accum_steps=plan.grad_accum_steps)
    parts = task.build(config, context)
    seed_everything(config.seed + state.rank)  # the random draws of training (drop path, mixup) differ
    logger.info("%s: %s; %d process(es), strategy %s", task.name, describe_parameters(parts.model),
                state.world_size, config.distributed.strategy)

    trained = parts.weights if parts.weights is not None else parts.model
    compile_units(parts, config.loop.compile)
    model = wrap_model(parts.model, config.distributed, device=state.device, world_size=state.world_size,
                       shard_units=parts.shard_units, sync_buffers=parts.sync_buffers)
    groups = parts.param_groups
    if callable(groups):
        groups = groups(trained)
    elif groups is not None and config.distributed.strategy == "fsdp":
        raise TypeError(f"{task.name}: TrainingParts.param_groups is a list built before FSDP replaced the parameters; "
                        "give a callable (weights) -> groups, which the runner calls after wrapping")
    optimizer = build_training_optimizer(trained, groups, config, state.world_size)
    checkpointer = (ShardedCheckpointer if config.distributed.strategy == "fsdp" else FileCheckpointer)(
        trained, optimizer, is_main_process=state.is_main_process)
    loop = dataclasses.replace(config.loop, grad_accum_steps=plan.grad_accum_steps, compile=False, **parts.loop_updates)
    evaluator = _AllReducedEvaluation(parts.evaluation, state.device) if parts.evaluation is not None else None
    trainer = Trainer(
        model, parts.step, parts.data, optimizer, optim=config.optim, loop=loop, checkpoint=config.checkpoint,
        out_dir=output_dir, steps_per_epoch=parts.steps_per_epoch, hooks=[*parts.hooks, *hooks],
        eval_fn=evaluator, config=to_dict(config), is_main_process=state.is_main_process, rank=state.rank,
        world_size=state.world_size, checkpointer=checkpointer,
    )
    result = trainer.train()
    if evaluator is not None and evaluator.last is None:
        # A run that had nothing left to do (re-running a finished one) still reports its validation metrics.
        was_training = model.training
        model.eval()
        with torch.no_grad(), trainer.precision.autocast():
            evaluator(model)
        model.train(was_training)
    full = full_weights(trained, parts.skeleton, state.is_main_process)
    exported = dict(parts.export(full, output_dir)) if parts.export is not None and state.is_main_process else {}
    summary = {
        "task": task.name,
        "steps": result.step,
        "epochs": result.step / trainer.steps_per_epoch if trainer.steps_per_epoch else None,
        "train_loss": _float_or_none((result.metrics or {}).get("loss")),
        "final_metrics": {k: float(v) for k, v in (result.metrics or {}).items()},
        "validation": evaluator.last if evaluator is not None else None,
        "nonfinite_skipped": result.nonfinite_skipped,
        "stopped_early": result.stopped_early,
        "data": result.data_totals,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "processes": state.world_size,
        "strategy": config.distributed.strategy,
        "batch": plan.as_dict(),
        **exported,
        **task.results(config, result, parts),
    }
    if state.is_main_process:
        write_summary(output_dir, summary)
    return summary


def write_summary(output_dir: Path, summary: Mapping[str, Any]) -> Path:
    """``output_dir/summary.json``, written atomically (a reader never sees half a file)."""
    from evamim.atomic import write_text

    path = Path(output_dir) / "summary.json"
    write_text(path, json.dumps(summary, indent=2, default=json_default) + "\n")
    return path


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for task results: tensors as lists, paths as strings, numbers as floats."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return float(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's global generators: timm's augmentations and mixup draw from them."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe_parameters(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total:,} parameters ({trainable:,} trained)"


def build_training_optimizer(model: nn.Module, groups: list[dict] | None, config: Any,
                             world_size: int) -> torch.optim.Optimizer:
    """``config.optim`` over ``groups`` (default: the model's weight-decay / layer-decay groups); under
    ``zero1`` with several processes each process keeps the optimizer state of its share."""
    from evamim.engine import build_optimizer, param_groups
    from evamim.engine.distributed import build_optimizer_for_strategy

    optim = config.optim
    if groups is None:
        groups = param_groups(model, optim.weight_decay, layer_decay=optim.layer_decay)
    return build_optimizer_for_strategy(
        config.distributed.strategy, groups, lambda share: build_optimizer(model, optim, groups=share),
        world_size=world_size, defaults={"lr": optim.lr, "weight_decay": optim.weight_decay},
    )


def compile_units(parts: TrainingParts, enabled: bool) -> None:
    """``loop.compile``: ``torch.compile`` each of the task's shard units (the transformer blocks) in place, or the
    whole model when the task names none. Per block, before any wrapping: identical blocks share one compiled
    graph, FSDP shards and activation checkpointing stay per block, and the state-dict keys do not change."""
    if not enabled:
        return
    for unit in parts.shard_units or (parts.model,):
        unit.compile()


def full_weights(model: nn.Module, skeleton: Callable[[], nn.Module] | None, is_main_process: bool) -> nn.Module:
    """``model`` with its full weights: itself, or for an FSDP-sharded one a copy gathered onto the main
    process's CPU, shard by shard (a collective: every process calls this; other processes get ``model``)."""
    if not _is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process:
        return model
    with torch.device("meta"):
        plain = skeleton() if skeleton is not None else type(model)(model.config)
    plain.load_state_dict(full, assign=True)
    return plain


def _is_sharded(module: nn.Module) -> bool:
    from evamim.engine.loop.parallel import is_dtensor

    return any(is_dtensor(p) for p in module.parameters())


# ------------------------------------------------------------------------------------------- evaluation
class _AllReducedEvaluation:
    """The loop's ``eval_fn`` for an :class:`Evaluation`: sums over this process's share, all-reduced.

    A sharded (FSDP) model's forward is a collective, so every process must call it equally often: a process
    with fewer validation batches scores its last batch again and discards the result.
    """

    def __init__(self, evaluation: Evaluation, device: torch.device):
        self.evaluation = evaluation
        self.device = device
        self.last: dict[str, float] | None = None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        loader = self.evaluation.loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(0)  # the same images every time, from the first
        limit = getattr(self.evaluation, "max_batches", None)
        gathered = getattr(self.evaluation, "gathered", False)
        # Known before the first forward: a process that runs out early keeps step with the others.
        most = self._most_batches(loader, limit) if _is_sharded(model) else None
        sums: dict[str, torch.Tensor] = {}
        records: list[Any] = []
        batches, last = 0, None
        for batch in loader:
            if limit is not None and batches >= limit:
                break
            if gathered:
                records += self.evaluation.collect(model, batch)
            else:
                _add(sums, self.evaluation.score(model, batch))
            batches, last = batches + 1, batch
        if most is not None:
            self._replay(model, last, most - batches)
        if gathered:
            self.last = self.evaluation.finalize(_gather_records(records))
        else:
            names, totals = self._reduce(sums)
            self.last = self.evaluation.finalize(dict(zip(names, totals)))
        return self.last

    @staticmethod
    def _most_batches(loader: Iterable, limit: int | None) -> int:
        """The largest number of validation batches of any process (a collective)."""
        from evamim.engine.distributed import all_gather_object

        try:
            mine = len(loader)
        except TypeError:
            raise ValueError("evaluating a sharded (FSDP) model needs a validation set of known length "
                             "(a folder, a list, or shards with shard-info files)") from None
        mine = mine if limit is None else min(mine, limit)
        return max(all_gather_object(mine))

    def _reduce(self, sums: dict[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
        """Every process's sums added up (a collective); a process without a batch contributes zeros."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return sorted(sums), [sums[name] for name in sorted(sums)]
        from evamim.engine.distributed import all_gather_object

        shapes: dict[str, tuple[int, ...]] = {}
        for entry in all_gather_object({name: tuple(value.shape) for name, value in sums.items()}):
            shapes.update(entry)
        names = sorted(shapes)
        vector = torch.cat([sums[name].reshape(-1) if name in sums else torch.zeros(shapes[name]).double().reshape(-1)
                            for name in names]) if names else torch.zeros(0, dtype=torch.float64)
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        vector = vector.to(device)
        dist.all_reduce(vector)
        totals, start = [], 0
        for name in names:
            size = int(torch.Size(shapes[name]).numel())
            totals.append(vector[start : start + size].cpu().reshape(shapes[name]))
            start += size
        return names, totals

    def _replay(self, model: nn.Module, last: Any, missing: int) -> None:
        """Run the forwards this process lacks (on its last batch, results discarded)."""
        if missing > 0 and last is None:
            raise ValueError("a process has no validation batch while the model is sharded (FSDP): the validation "
                             "set needs at least as many images as there are processes")
        forward = self.evaluation.collect if getattr(self.evaluation, "gathered", False) else self.evaluation.score
        for _ in range(missing):
            forward(model, last)


def _gather_records(records: list[Any]) -> list[Any]:
    """Every process's records, concatenated in rank order (a collective when several processes run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return records
    from evamim.engine.distributed import all_gather_object

    return [record for share in all_gather_object(records) for record in share]


def _add(sums: dict[str, torch.Tensor], scores: Mapping[str, torch.Tensor]) -> None:
    for name, value in scores.items():
        value = torch.as_tensor(value).detach().double().cpu()
        sums[name] = sums[name] + value if name in sums else value


# ------------------------------------------------------------------------------------- evaluation tasks
@contextlib.contextmanager
def evaluation_process(device_name: str):
    """Join the job the launcher describes (torchrun or SLURM; ``evamim.engine.distributed``), yield this
    process's device (``cuda:LOCAL_RANK`` with several GPUs per node) and leave the group it created.

    Raises:
        ConfigError: a device that cannot work here (the message says what to change).
    """
    from evamim.config import ConfigError
    from evamim.engine.distributed import DistributedConfig, destroy_distributed, init_distributed

    try:
        state = init_distributed(DistributedConfig(), device_name)
    except ValueError as error:
        raise ConfigError(f"device: {error}") from None
    try:
        yield state.device
    finally:
        destroy_distributed(state)
