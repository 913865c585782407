"""Sharded training checkpoints for FSDP (:class:`ShardedCheckpointer`): a directory ``step-<9-digit step>/``
written with ``torch.distributed.checkpoint`` (DCP).

Every process writes its own shards of the weights and optimizer moments (``__<rank>_0.distcp``), the
coordinator the index (``.metadata``), and the main process ``trainer.pt`` with everything else (step, RNG and
data positions, hooks, config, the optimizer's hyper-parameters, the CRC-32 of every shard) in the
``weights_only`` format of a single-file checkpoint. DCP reshards on load, so a checkpoint written by N
processes resumes on M (including one process without a process group). Only tensors go through DCP (it
unpickles anything else with ``weights_only=False``).

Atomicity: the directory is written as hidden ``.step-<step>.partial/`` and renamed into place
(:func:`evamim.atomic.replace_dir`) once every shard and ``trainer.pt`` are on disk; discovery ignores partial
directories and the next save removes them. A directory whose shards are missing, shorter than the index says
or whose bytes changed is reported and skipped like a truncated file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from evamim import atomic
from evamim.engine.checkpoint.file import atomic_save, load_checkpoint
from evamim.engine.checkpoint.integrity import (
    check_plain,
    check_shards,
    shard_checksums,
    shard_reader,
    verify_shard_checksums,
)
from evamim.engine.checkpoint.layout import (
    FORMAT,
    PARTIAL_SUFFIX,
    TRAINER_FILE,
    VERSION,
    CheckpointError,
    list_checkpoints,
    list_sharded_checkpoints,
    prune_sharded_checkpoints,
    refuse_newer_other_layout,
    sharded_checkpoint_path,
)

# Every checkpoint message shares one logger name, so one filter covers them.
_log = logging.getLogger("evamim.engine.checkpoint")


class ShardedCheckpointer:
    """Sharded checkpoint directories written with torch.distributed.checkpoint (FSDP; see the module doc).

    ``module`` is the model whose parameter names the checkpoint uses (the unwrapped student, possibly
    with FSDP-sharded submodules); ``optimizer`` steps its parameters. Works without a process group too
    (one process reading or writing every shard).
    """

    layout = "sharded"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, is_main_process: bool = True):
        self.module = module
        self.optimizer = optimizer
        self.is_main_process = is_main_process

    def model_optimizer_state(self) -> dict:
        """This process's view: ``{"model": ..., "optimizer": ...}`` with sharded tensors (DTensors) under
        FSDP, parameter names as optimizer keys. Initialises an empty optimizer state (a zero-lr step)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_model_optimizer_state(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def list(self, directory: str | os.PathLike) -> list[tuple[int, Path]]:
        return list_sharded_checkpoints(directory)

    def save(self, directory: str | os.PathLike, step: int, keep_last: int, extra: Mapping[str, Any]) -> Path | None:
        """Write ``step-<step>/`` (every process writes its shards); returns its path on the main process."""
        import torch.distributed.checkpoint as dcp

        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the checkpoint just written is always kept), got {keep_last}")
        directory = Path(directory)
        final = sharded_checkpoint_path(directory, step)
        partial = directory / f".{final.name}{PARTIAL_SUFFIX}"
        tensors, plain = split_tensors(self.model_optimizer_state())
        payload = {"format": FORMAT, "version": VERSION, "layout": self.layout, **extra, "plain": plain,
                   "step": int(step)}
        check_plain(payload)  # on every process, before any shard is written, so all of them stop together
        if self.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)  # left by a save at this step that was killed
            partial.mkdir()
        _barrier()  # nobody writes into the partial directory before it exists (and is empty)
        with _quiet_single_process():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(partial), sync_files=True), no_dist=_no_dist())
        # dcp.save returns once every shard and the index are written and fsync'ed on every process.
        checksums = shard_checksums(partial)
        if not self.is_main_process:
            return None
        payload["checksums"] = checksums
        atomic_save(payload, partial / TRAINER_FILE)
        atomic.replace_dir(partial, final)  # a stale directory at this step (one that did not load) is replaced
        _log.info("saved checkpoint %s", final)
        prune_sharded_checkpoints(directory, keep_last, newest=final)
        return final

    def load(self, path: str | os.PathLike) -> dict:
        """Restore the model and optimizer from the directory ``path``; returns ``trainer.pt``'s content."""
        path = Path(path)
        if path.is_file():
            raise CheckpointError(f"{path} is a single-file checkpoint but this run (FSDP) writes sharded checkpoint "
                                  "directories; resume it with distributed.strategy=ddp or zero1")
        extra, problem = _read_on_every_process(path)
        if problem is not None:
            raise problem
        self._restore(path, extra)
        return extra

    def load_latest(self, directory: str | os.PathLike) -> tuple[Path, dict] | None:
        """Restore from the newest checkpoint directory that loads on every process; ``(path, trainer state)``
        or None. A newer unreadable one is reported and skipped; if none loads, that is an error."""
        found = self.list(directory)
        refuse_newer_other_layout(directory, found, list_checkpoints(directory), self.layout)
        failures = []
        for step, path in reversed(found):
            extra, problem = _read_on_every_process(path)
            if problem is not None:
                _log.warning("skipping checkpoint %s: it does not load (%s); trying the previous one", path, problem)
                failures.append(path)
                continue
            self._restore(path, extra)
            if failures:
                _log.warning("resuming from %s (step %d) instead of the newer, unreadable %s",
                             path, step, ", ".join(str(p) for p in failures))
            return path, extra
        if failures:
            raise CheckpointError(f"none of the {len(failures)} checkpoints in {directory} loads; move them away to "
                                  "start fresh, or point the run at a good checkpoint directory")
        return None

    def _restore(self, path: Path, extra: Mapping[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        # The destination decides the layout: this run's shards (any number of processes) or full tensors.
        tensors, _ = split_tensors(self.model_optimizer_state())
        with _quiet_single_process():
            dcp.load(tensors, storage_reader=shard_reader(path), no_dist=_no_dist())
        self.load_model_optimizer_state(merge_trees(tensors, extra["plain"]))


def read_sharded_checkpoint(path: str | os.PathLike) -> dict:
    """``trainer.pt`` of a sharded checkpoint, after checking that every shard the index names is complete and,
    for this process's share of the files, that their bytes match the checksums written at save.

    Raises :class:`CheckpointError` (naming the directory) if ``trainer.pt`` or the index do not load (or the
    index is not one evamim writes), a shard file is missing or shorter than the index says (a copy or write
    that did not finish), or a file's checksum differs (a disk or copy error).
    """
    path = Path(path)
    state = load_checkpoint(path / TRAINER_FILE)
    if state.get("layout") != ShardedCheckpointer.layout or "plain" not in state:
        raise CheckpointError(f"{path} is not a sharded evamim checkpoint ({TRAINER_FILE} has no sharded layout marker)")
    check_shards(path)
    verify_shard_checksums(path, state.get("checksums"))
    return state


def _read_on_every_process(path: Path) -> tuple[dict | None, CheckpointError | None]:
    """:func:`read_sharded_checkpoint` on every process (a collective): ``(trainer state, None)`` when every
    process could read its share, else ``(None, the error)``. The processes restore collectively from one
    directory, so they must all make the same choice; one whose own share was fine reports the other's failure."""
    from evamim.engine.distributed import all_ranks_agree

    extra, problem = None, None
    try:
        extra = read_sharded_checkpoint(path)
    except CheckpointError as err:
        problem = err
    if all_ranks_agree(problem is None):
        return extra, None
    return None, problem or CheckpointError(f"checkpoint {path} does not load on another process (see its log)")


def _barrier() -> None:
    from evamim.engine.distributed import barrier

    barrier()


def _no_dist() -> bool:
    """One process without a process group reads and writes every shard itself."""
    from evamim.engine.distributed import get_world_size

    return get_world_size() == 1


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process whenever there is no process group, even when told so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def split_tensors(tree: Mapping[str, Any]) -> tuple[dict, dict]:
    """Nested dicts -> ``(tensor leaves, every other leaf)``, both with the original nesting.
    Empty dicts are kept on the plain side so that :func:`merge_trees` restores them."""
    tensors, plain = {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub_tensors, sub_plain = split_tensors(value)
            if sub_tensors:
                tensors[key] = sub_tensors
            if sub_plain or not sub_tensors:
                plain[key] = sub_plain
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            plain[key] = value
    return tensors, plain


def merge_trees(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict:
    """The union of two nested dicts (inverse of :func:`split_tensors`)."""
    merged = dict(first)
    for key, value in second.items():
        if key in merged and isinstance(merged[key], Mapping) and isinstance(value, Mapping):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged
