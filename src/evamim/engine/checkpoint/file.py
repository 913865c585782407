"""Single-file training checkpoints: ``step-<9-digit step>.pt``, and the checkpointer of one process, DDP and
ZeRO-1 (:class:`FileCheckpointer`).

A file is written through :mod:`evamim.atomic` (temp file in the same directory, fsync, ``os.replace``, fsync
the directory): a reader sees either no file or the complete one, and a process killed while writing leaves
only a hidden ``.step-*.tmp`` file that discovery ignores and the next save removes. One process saves the
full state here, so one file is enough: a directory per checkpoint would need several files to become
visible at once.

A checkpoint is a dict of plain types and tensors only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim import atomic
from evamim.engine.checkpoint.integrity import LOAD_ERRORS, check_plain, verify_zip_checksums, zip_checksums_on
from evamim.engine.checkpoint.layout import (
    FORMAT,
    VERSION,
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    list_sharded_checkpoints,
    prune_checkpoints,
    refuse_newer_other_layout,
)

# Every checkpoint message shares one logger name, so one filter covers them.
_log = logging.getLogger("evamim.engine.checkpoint")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` so that ``path`` is either absent/old or the complete new file, with a CRC-32
    per record (:func:`~evamim.engine.checkpoint.integrity.verify_zip_checksums` checks them). On an exception
    the temp file is removed and the exception propagates."""
    with atomic.open_for_write(path, "wb") as handle, zip_checksums_on():
        torch.save(obj, handle)


def save_checkpoint(state: dict, directory: str | os.PathLike, step: int, keep_last: int) -> Path:
    """Write ``state`` (plus format marker and ``step``) as ``step-<step>.pt`` in ``directory`` atomically,
    then delete older checkpoints beyond ``keep_last`` and stale temp files of killed writers.

    The new file is complete (renamed and fsync'ed) before anything is deleted, and it is never deleted
    itself. Checkpoints with a *higher* step than this one (left by a run that was resumed from an older
    checkpoint) are not touched.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the checkpoint just written is always kept), got {keep_last}")
    payload = {"format": FORMAT, "version": VERSION, **state, "step": int(step)}
    check_plain(payload)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    atomic_save(payload, path)
    _log.info("saved checkpoint %s", path)
    prune_checkpoints(directory, keep_last, newest=path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint onto the CPU with ``weights_only=True``.

    Raises :class:`CheckpointError` (naming the file) if it is truncated, unreadable, corrupt (a byte differs
    from the checksums written at save: :func:`verify_zip_checksums`) or not a training checkpoint written by
    :func:`save_checkpoint`.
    """
    path = Path(path)
    verify_zip_checksums(path)
    try:
        # mmap: the processes of a node share one page-cache copy instead of each reading the file into RAM.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except LOAD_ERRORS as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {str(err)[:300]}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an evamim training checkpoint (no format marker {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this code reads {VERSION}")
    return state


def find_latest_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``directory`` that loads, as ``(path, state)``; ``None`` if there is none.

    A newer file that fails to load (e.g. truncated) is reported with a warning naming it, and the next
    older one is tried. If files exist but none loads, that is an error rather than a silent fresh start.
    """
    found = list_checkpoints(directory)
    failures = []
    for step, path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            _log.warning("skipping checkpoint %s: it does not load (%s); trying the previous one", path, err)
            failures.append(path)
            continue
        if failures:
            _log.warning("resuming from %s (step %d) instead of the newer, unreadable %s",
                         path, step, ", ".join(str(p) for p in failures))
        return path, state
    if failures:
        raise CheckpointError(
            f"none of the {len(failures)} checkpoints in {directory} loads; move them away to start fresh, or "
            "point the run at a good checkpoint file"
        )
    return None


class FileCheckpointer:
    """Single-file checkpoints of ``module`` and ``optimizer`` (one process, DDP, ZeRO-1).

    ``module`` is the unwrapped model (its ``state_dict`` keys are the checkpoint's). Every process
    holds the full weights; under ZeRO-1 the optimizer state is consolidated onto the main process
    before saving, so the file is the same as a one-process run's.
    """

    layout = "file"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, is_main_process: bool = True):
        self.module = module
        self.optimizer = optimizer
        self.is_main_process = is_main_process

    def model_optimizer_state(self) -> dict:
        """``{"model": ..., "optimizer": ...}``. Under ZeRO-1 a collective, and the optimizer entry is
        None on every process but the main one."""
        return {"model": self.module.state_dict(), "optimizer": self._optimizer_state()}

    def _optimizer_state(self) -> dict | None:
        consolidate = getattr(self.optimizer, "consolidate_state_dict", None)
        if callable(consolidate):  # ZeroRedundancyOptimizer: each process holds a share of the state
            consolidate(to=0)
            return self.optimizer.state_dict() if self.is_main_process else None
        return self.optimizer.state_dict()

    def load_model_optimizer_state(self, state: Mapping[str, Any], path: str | os.PathLike = "the checkpoint") -> None:
        try:
            self.module.load_state_dict(state["model"])
        except RuntimeError as error:  # another architecture: torch lists every mismatch, one per line
            details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            raise CheckpointError(
                f"{path} was written for another model ({details[0] if details else error}"
                f"{f', and {len(details) - 1} more' if len(details) > 1 else ''}): its output_dir holds another "
                "run's checkpoints; choose a new output_dir, or checkpoint.resume=never to start this run over") from None
        # A ZeroRedundancyOptimizer takes the consolidated state and keeps its own share.
        self.optimizer.load_state_dict(state["optimizer"])

    def list(self, directory: str | os.PathLike) -> list[tuple[int, Path]]:
        return list_checkpoints(directory)

    def save(self, directory: str | os.PathLike, step: int, keep_last: int, extra: Mapping[str, Any]) -> Path | None:
        """Write ``step-<step>.pt`` (main process); returns its path there, None elsewhere."""
        state = self.model_optimizer_state()
        if not self.is_main_process:
            return None
        return save_checkpoint({**state, **extra}, directory, step, keep_last)

    def load(self, path: str | os.PathLike) -> dict:
        """Restore the model and optimizer from ``path``; returns the whole checkpoint."""
        path = Path(path)
        if path.is_dir():
            raise CheckpointError(f"{path} is a sharded (FSDP) checkpoint directory but this run writes single-file "
                                  "checkpoints; resume it with distributed.strategy=fsdp")
        state = load_checkpoint(path)
        self.load_model_optimizer_state(state, path)
        return state

    def load_latest(self, directory: str | os.PathLike) -> tuple[Path, dict] | None:
        """Restore from the newest checkpoint in ``directory`` that loads; ``(path, checkpoint)`` or None."""
        refuse_newer_other_layout(directory, self.list(directory), list_sharded_checkpoints(directory), self.layout)
        found = find_latest_checkpoint(directory)
        if found is None:
            return None
        path, state = found
        self.load_model_optimizer_state(state, path)
        return path, state
