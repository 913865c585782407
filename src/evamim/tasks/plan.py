"""``--dry-run``: what a training run would do, from the config alone, in seconds on a CPU.

Models are built on the meta device (no memory, no weights read, nothing downloaded); the dataset is only
counted where that is cheap (``data.samples_per_epoch``, a synthetic source, a folder or list that exists).
The report: parameter counts, the batch arithmetic (what the optimizer sees), steps per epoch, total steps,
the schedule's milestones, and a memory estimate for weights, gradients and optimizer state.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

# Bytes per trained parameter kept by the optimizer: AdamW's two moments, SGD/LARS's momentum.
_OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "lars": 4, "sgd": 4}


def describe_run(config: Any, models: Mapping[str, nn.Module], lines: list[str], *,
                 dataset: tuple[int | None, str] | None = None) -> str:
    """The dry-run report of a training task: ``lines`` (the task's own) then the common plan. ``dataset``:
    (training samples per epoch or None, where that comes from or why it is unknown); default: counted from
    ``config.data`` (:func:`count_samples`)."""
    from evamim.tasks.batching import batch_plan, launch_world_size

    world = launch_world_size()
    plan = batch_plan(config, world)
    out = list(lines)
    for name, model in models.items():
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out.append(f"{name} parameters: {total:,} ({trained:,} trained)")
    out.append(f"batch: {plan.describe()}")
    size, origin = dataset if dataset is not None else count_samples(config.data)
    steps_per_epoch = None
    if size is not None:
        share = size // world  # every process takes the same number of samples
        steps_per_epoch = share // plan.per_process
        out.append(f"data: {size:,} samples per epoch ({origin}) -> {steps_per_epoch:,} steps per epoch")
    else:
        out.append(f"data: size unknown ({origin}); steps per epoch are known once the data is read")
    out += schedule_lines(config, steps_per_epoch)
    out += memory_lines(config, models, world)
    out.append(f"output: {config.output_dir} (processes: {world}, strategy {config.distributed.strategy}, "
               f"precision {config.loop.precision})")
    return "\n".join(out)


def count_samples(data: Any) -> tuple[int | None, str]:
    """(images in one epoch over all processes, where the number comes from), or (None, why not)."""
    if data.samples_per_epoch is not None:
        return data.samples_per_epoch, "data.samples_per_epoch"
    try:
        kind = data.resolve_source()
    except (ValueError, FileNotFoundError) as error:
        return None, str(error)
    if kind == "synthetic":
        return data.synthetic_size, "data.synthetic_size"
    if kind == "shards":
        try:
            from evamim.data.shard_info import shard_set_size
            from evamim.data.shards import expand_shards

            listed = shard_set_size(expand_shards(data.path))
        except (FileNotFoundError, ValueError, ModuleNotFoundError, OSError) as error:
            return None, f"shards: {error}"
        if listed:
            return listed, f"the shard-info files next to {data.path}"
        return None, "shards without shard-info files: set data.samples_per_epoch"
    try:
        from evamim.data.sources import build_source

        return len(build_source(data)), f"{kind} {data.path}"
    except (ValueError, FileNotFoundError, OSError) as error:
        return None, str(error)


def total_steps(config: Any, steps_per_epoch: int | None) -> int | None:
    if config.loop.total_steps is not None:
        return config.loop.total_steps
    if config.loop.epochs is not None and steps_per_epoch:
        return round(config.loop.epochs * steps_per_epoch)
    return None


def schedule_lines(config: Any, steps_per_epoch: int | None) -> list[str]:
    """Total steps, warmup end, learning rates, evaluation and checkpoint intervals."""
    optim, loop = config.optim, config.loop
    total = total_steps(config, steps_per_epoch)
    length = f"{total:,} steps" if total is not None else "unknown length"
    if loop.epochs is not None and loop.total_steps is None:
        length += f" ({loop.epochs:g} epochs)"
    if optim.warmup_steps is not None:
        warmup = f"{optim.warmup_steps:,} steps"
    elif optim.warmup_epochs and steps_per_epoch:
        warmup = f"{round(optim.warmup_epochs * steps_per_epoch):,} steps ({optim.warmup_epochs:g} epochs)"
    else:
        warmup = f"{optim.warmup_epochs or 0:g} epochs"
    lines = [f"schedule: {length}; warmup {warmup} to lr {optim.lr:g}, then {optim.schedule} to {optim.min_lr:g}; "
             f"optimizer {optim.name}, weight decay {optim.weight_decay:g}"]
    every = config.checkpoint.every
    lines.append(f"checkpoints: every {every} steps, keep {config.checkpoint.keep_last}"
                 if every else "checkpoints: at the end only")
    if loop.eval_every:
        lines.append(f"evaluation: every {loop.eval_every} steps and at the end")
    return lines


def memory_lines(config: Any, models: Mapping[str, nn.Module], world: int) -> list[str]:
    """Weights (fp32), gradients and optimizer state per process; activations are not estimated."""
    trained = sum(p.numel() for model in models.values() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for model in models.values() for p in model.parameters() if not p.requires_grad)
    state = _OPTIMIZER_STATE_BYTES.get(config.optim.name, 8)
    strategy = config.distributed.strategy if world > 1 else "ddp"
    weights, grads, optimizer = 4 * trained, 4 * trained, state * trained
    if strategy == "fsdp":
        weights, grads, optimizer = weights / world, grads / world, optimizer / world
    elif strategy == "zero1":
        optimizer /= world
    total = weights + grads + optimizer + 4 * frozen
    return [f"memory per process: {_gib(total)} for fp32 weights ({_gib(weights + 4 * frozen)}), gradients "
            f"({_gib(grads)}) and {config.optim.name} state ({_gib(optimizer)}); activations come on top "
            "(model.grad_checkpointing lowers them)"]


def _gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
