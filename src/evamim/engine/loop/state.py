"""The part of :class:`~evamim.engine.loop.trainer.Trainer` that saves and restores a run: what a checkpoint
of the loop holds, each process's own state (RNG streams, data position), hook states, and when a due
checkpoint is written (never while the run may be diverging).

Several methods are collectives with several processes (they gather or reduce over the processes): every
process must call them, as the loop does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from evamim.engine.checkpoint import any_checkpoints, capture_rng_state, checkpoint_dir, restore_rng_state
from evamim.engine.loop.parallel import is_dtensor

if TYPE_CHECKING:
    from evamim.engine.loop.config import Hook

# Every loop message shares one logger name, so one filter covers them.
_log = logging.getLogger("evamim.engine.loop")


class TrainerCheckpointing:
    """Checkpoint and resume methods of the Trainer, which sets the attributes they use (``checkpointer``,
    ``cursor``, ``hooks``, ``precision``, ``step``, ``world_size``, ...) in its ``__init__``."""

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
        local = [p.to_local() if is_dtensor(p) else p for p in params]
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
