"""Training checkpoints: atomic save, keep-last-k, discovery of the newest checkpoint that loads, RNG state.

Layout: one file per checkpoint, ``<out_dir>/checkpoints/step-<9-digit step>.pt``. A single file is
written to a temporary name in the same directory, flushed and fsync'ed, then renamed over the final
name with ``os.replace``, which is atomic on POSIX: a reader sees either no file or the complete one, and
a process killed while writing leaves only a hidden ``.step-*.tmp`` file that discovery ignores (and the
next save removes). A directory per checkpoint would need several files to become visible at once,
which needs a marker file or a directory rename; one process saves the full state in this engine, so
one file keeps it simple. The step is in the name, so discovery needs no ``latest`` pointer that could
disagree with the files.

A checkpoint is a dict of plain types and tensors only, so it loads with ``torch.load(weights_only=True)``
(no arbitrary code runs when loading a file someone handed you); :func:`save_checkpoint` rejects anything
else up front, naming the offending entry, rather than writing a file that will not load.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_log = logging.getLogger(__name__)

FORMAT = "evamim-train-checkpoint"
VERSION = 1
SUBDIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9,})\.pt$")
_TMP_PREFIX = ".step-"

# What torch.load raises on a truncated or garbled file (zip reader errors, unpickling, short reads).
_LOAD_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError, KeyError)


@dataclass
class CheckpointConfig:
    """When to write checkpoints, how many to keep, and where to resume from."""

    every: int = 1000
    """Save every this many optimizer steps (0 = only at the end); a checkpoint is always written at the end."""
    keep_last: int = 3
    """Keep this many newest checkpoints (>= 1); older ones are deleted after a new one is complete."""
    resume: str = "auto"
    """``auto``: continue from the newest checkpoint in the output directory that loads (start fresh if
    there is none); ``never``: start fresh, and refuse if the directory already has checkpoints; or the
    path of a checkpoint file to continue from."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded or is not a training checkpoint."""


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / SUBDIR


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files in ``directory``, oldest first (temp files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


# ----------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """The global RNG states of Python, NumPy, torch CPU and (if initialised) every CUDA device,
    as tensors and plain types (``weights_only``-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state["cuda"]
    if cuda_states:
        if not torch.cuda.is_available():
            _log.warning("checkpoint holds CUDA RNG states but CUDA is not available here; they are not restored")
        else:
            if len(cuda_states) != torch.cuda.device_count():
                _log.warning("checkpoint holds %d CUDA RNG states, this machine has %d devices; restoring the first %d",
                             len(cuda_states), torch.cuda.device_count(),
                             min(len(cuda_states), torch.cuda.device_count()))
            for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)


def _as_tuple(value):
    """``random.setstate`` needs nested tuples; keep them tuples even if a list came back."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------- saving

# Exact types: subclasses such as numpy.float64 (a float) or defaultdict (a dict) fail weights_only loading.
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first entry of ``obj`` that ``torch.load(weights_only=True)`` would
    refuse (anything but dicts, lists, tuples, str, numbers, bools, None and tensors)."""
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            check_plain(value, f"{where}.{key}")
        return
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            check_plain(value, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which torch.load(weights_only=True) "
        "cannot read back; convert it to a tensor or plain Python types (int, float, str, list, dict)"
    )


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` so that ``path`` is either absent/old or the complete new file.

    Writes a temp file in the same directory (same filesystem, so the rename is atomic), flushes and
    fsyncs it, ``os.replace``s it over ``path``, then fsyncs the directory so the rename itself survives a
    power loss. On an exception the temp file is removed and the exception propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 so the umask decides the permissions, as for any other file the run writes.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows; the rename is durable there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def prune_checkpoints(directory: Path, keep_last: int, newest: Path) -> None:
    """Delete checkpoints older than ``newest`` so that ``keep_last`` remain, counting ``newest``;
    remove leftover temp files of writers that were killed."""
    newest_step = int(_NAME.match(newest.name).group(1))
    older = [path for step, path in list_checkpoints(directory) if step < newest_step]
    for path in older[: max(len(older) - (keep_last - 1), 0)]:
        path.unlink()
        _log.info("deleted old checkpoint %s (keep_last=%d)", path, keep_last)
    for tmp in directory.glob(f"{_TMP_PREFIX}*.tmp"):
        tmp.unlink(missing_ok=True)  # a concurrent unlinker is the only way it can vanish first
        _log.info("removed %s, left by a save that did not finish", tmp)


# ------------------------------------------------------------------------------------------ loading


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint onto the CPU with ``weights_only=True``.

    Raises :class:`CheckpointError` (naming the file) if it is truncated, unreadable or not a training
    checkpoint written by :func:`save_checkpoint`.
    """
    path = Path(path)
    try:
        # mmap: the processes of a node share one page-cache copy instead of each reading the file into RAM.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _LOAD_ERRORS as err:
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
