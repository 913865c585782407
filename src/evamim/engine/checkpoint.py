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

Two layouts, chosen by the training strategy through a *checkpointer* (what the loop calls):

- :class:`FileCheckpointer` (one process, DDP, ZeRO-1): the single file above, written by the main
  process. Under ZeRO-1 the optimizer state is first consolidated onto the main process
  (``consolidate_state_dict(to=0)``, a collective), so the file is the same as a one-process run's and
  resumes on any number of processes.
- :class:`ShardedCheckpointer` (FSDP): a directory ``step-<9-digit step>/`` written with
  ``torch.distributed.checkpoint`` (DCP): every process writes its own shards of the weights and
  optimizer moments (``__<rank>_0.distcp``), the coordinator the index (``.metadata``), and the main
  process ``trainer.pt`` with everything else (step, RNG and data positions, hooks, config, the
  optimizer's hyper-parameters) in the weights_only format above. DCP reshards on load, so a checkpoint
  written by N processes resumes on M (including one process without a process group). Atomicity: the
  directory is written as hidden ``.step-<step>.partial/`` and renamed into place once every shard and
  ``trainer.pt`` are on disk; discovery ignores partial directories and the next save removes them. A
  directory whose shards are missing or shorter than the index says is reported and skipped like a
  truncated file. Only tensors go through DCP (it unpickles anything else with ``weights_only=False``).
  Its ``.metadata`` index is itself a pickle: evamim reads it with an unpickler that admits only the
  classes of a DCP index, and refuses an index that declares anything but tensors (:func:`read_shard_index`).

Integrity: a single-file checkpoint is a torch.save zip archive with a CRC-32 per record, verified before
loading; ``trainer.pt`` of a sharded checkpoint holds the CRC-32 of every shard file, verified on resume. A
checkpoint whose bytes changed after it was written is skipped like a truncated one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import random
import re
import secrets
import shutil
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

_log = logging.getLogger(__name__)

FORMAT = "evamim-train-checkpoint"
VERSION = 1
SUBDIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9,})\.pt$")
_DIR_NAME = re.compile(r"^step-(\d{9,})$")
_TMP_PREFIX = ".step-"
_PARTIAL_SUFFIX = ".partial"
TRAINER_FILE = "trainer.pt"

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
    path of a checkpoint file (or, for FSDP, a checkpoint directory) to continue from."""

    def __post_init__(self) -> None:
        # Checked when the config is built, so a bad value stops the run before any model exists.
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0 (0 = only at the end), got {self.every}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1 (the newest checkpoint is always kept), "
                             f"got {self.keep_last}")
        if not self.resume:
            raise ValueError("checkpoint.resume must be 'auto', 'never' or the path of a checkpoint, got ''")


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
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle, _zip_checksums_on():
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _zip_checksums_on():
    """torch.save writes a CRC-32 per record of its zip archive unless turned off globally; evamim's checkpoints
    always have them: :func:`load_checkpoint` verifies every byte against them."""
    get, set_ = (getattr(torch.serialization, name, None) for name in ("get_crc32_options", "set_crc32_options"))
    if get is None or set_ is None:  # older torch: always computed
        yield
        return
    previous = get()
    set_(True)
    try:
        yield
    finally:
        set_(previous)


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

    Raises :class:`CheckpointError` (naming the file) if it is truncated, unreadable, corrupt (a byte differs
    from the checksums written at save: :func:`verify_zip_checksums`) or not a training checkpoint written by
    :func:`save_checkpoint`.
    """
    path = Path(path)
    verify_zip_checksums(path)
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


def verify_zip_checksums(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless every record of the torch.save archive ``path`` matches the CRC-32
    written with it. torch.load does not check them (with ``mmap`` it does not even read the tensors), so a
    flipped byte (a failing disk, a bad copy) would otherwise load silently and train on garbage."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot load checkpoint {path}: it is truncated or not a torch.save archive "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: the bytes of {damaged} do not match the checksum written "
                              "at save (a disk or copy error)")


def file_checksum(path: str | os.PathLike, chunk_bytes: int = 16 << 20) -> int:
    """CRC-32 of a file's bytes (zlib's, as in zip archives)."""
    checksum = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


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


# ------------------------------------------------------------------------------------ checkpointers
#
# What the training loop calls: capture/restore the model and optimizer, write a checkpoint with the
# loop's own state (``extra``: step, RNG and data positions, hooks, config) and find the newest one
# that loads. Every method that may communicate is called by every process.


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

    def load_model_optimizer_state(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
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
        self.load_model_optimizer_state(state)
        return state

    def load_latest(self, directory: str | os.PathLike) -> tuple[Path, dict] | None:
        """Restore from the newest checkpoint in ``directory`` that loads; ``(path, checkpoint)`` or None."""
        _refuse_newer_other_layout(directory, self.list(directory), list_sharded_checkpoints(directory), self.layout)
        found = find_latest_checkpoint(directory)
        if found is None:
            return None
        path, state = found
        self.load_model_optimizer_state(state)
        return path, state


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
        partial = directory / f".{final.name}{_PARTIAL_SUFFIX}"
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
        checksums = _shard_checksums(partial)
        if not self.is_main_process:
            return None
        payload["checksums"] = checksums
        atomic_save(payload, partial / TRAINER_FILE)
        _fsync_dir(partial)
        _replace_dir(partial, final)
        _fsync_dir(directory)
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
        _refuse_newer_other_layout(directory, found, list_checkpoints(directory), self.layout)
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
            dcp.load(tensors, storage_reader=_shard_reader(path), no_dist=_no_dist())
        self.load_model_optimizer_state(merge_trees(tensors, extra["plain"]))


def sharded_checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}"


def list_sharded_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the sharded checkpoint directories in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _DIR_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def any_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Every checkpoint in ``directory``, files and sharded directories."""
    return [path for _, path in list_checkpoints(directory) + list_sharded_checkpoints(directory)]


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
    _verify_shard_checksums(path, state.get("checksums"))
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


def _shard_checksums(directory: Path) -> dict[str, int]:
    """``{file name: CRC-32}`` of every file DCP wrote into ``directory`` (a collective with several processes):
    each process hashes the shards it wrote itself (``__<rank>_*.distcp``), the main process the index too."""
    from evamim.engine.distributed import all_gather_object, get_rank

    rank = get_rank()
    names = [shard.name for shard in directory.glob(f"__{rank}_*.distcp")] + ([".metadata"] if rank == 0 else [])
    merged: dict[str, int] = {}
    for part in all_gather_object({name: file_checksum(directory / name) for name in names}):
        merged.update(part)
    return merged


def _verify_shard_checksums(path: Path, checksums: Mapping[str, int] | None) -> None:
    """Check this process's share of ``checksums`` (each process a different slice of the files, so together
    they read each file once). Checkpoints written before checksums were stored are not checked."""
    from evamim.engine.distributed import get_rank, get_world_size

    if checksums is None:
        return
    for name in sorted(checksums)[get_rank()::get_world_size()]:
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{path}: {name} is missing (an interrupted copy?)")
        if file_checksum(shard) != checksums[name]:
            raise CheckpointError(f"checkpoint {path} is corrupt: the bytes of {name} do not match the checksum "
                                  "written at save (a disk or copy error)")


# The classes a DCP index (.metadata) pickles, which are all that may be unpickled from one: DCP reads it with
# plain pickle.load, so a planted .metadata would otherwise run code when a run resumes.
_SHARD_INDEX_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _ShardIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in _SHARD_INDEX_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True  # dtypes pickle as the attribute of torch
        if not allowed:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which an evamim checkpoint index never does")
        return super().find_class(module, name)


def read_shard_index(path: str | os.PathLike):
    """The DCP ``Metadata`` of the sharded checkpoint directory ``path``, unpickled without running code.

    Only the classes a DCP index consists of may be unpickled, and the index must describe what evamim writes:
    tensors only (a bytes entry would be loaded with ``torch.load(weights_only=False)``) in shard files inside
    the directory. Raises :class:`CheckpointError` naming the directory otherwise.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    index = Path(path) / ".metadata"
    try:
        with open(index, "rb") as handle:
            metadata = _ShardIndexUnpickler(handle).load()
    except (*_LOAD_ERRORS, AttributeError, ImportError, TypeError) as err:
        raise CheckpointError(f"refused the shard index {index}: {type(err).__name__}: {str(err)[:300]}") from None
    problem = None
    if not isinstance(metadata, Metadata):
        problem = f"it holds a {type(metadata).__name__}, not a DCP Metadata"
    elif not all(isinstance(entry, TensorStorageMetadata) for entry in metadata.state_dict_metadata.values()):
        problem = "it declares non-tensor entries, which evamim never writes"
    elif not all(isinstance(info, _StorageInfo) and Path(str(info.relative_path)).name == str(info.relative_path)
                 for info in (metadata.storage_data or {}).values()):
        problem = "it names shard files outside its directory"
    if problem:
        raise CheckpointError(f"refused the shard index {index}: {problem}")
    return metadata


@functools.cache
def _checked_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedShardReader(FileSystemReader):
        """DCP's file reader, with the index read by :func:`read_shard_index` instead of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_shard_index(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedShardReader


def _shard_reader(path: Path):
    """A DCP storage reader of the checkpoint directory ``path`` whose index is checked (DCP is imported lazily)."""
    return _checked_reader_class()(str(path))


def check_shards(path: Path) -> None:
    """Raise :class:`CheckpointError` if ``path``'s DCP index is refused (:func:`read_shard_index`) or a shard
    is missing/truncated."""
    metadata = read_shard_index(path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        actual = shard.stat().st_size if shard.is_file() else None
        if actual is None or actual < size:
            raise CheckpointError(f"{path}: shard {name} is {'missing' if actual is None else f'{actual} bytes'}, "
                                  f"the index needs {size} bytes (an interrupted copy or write?)")


def prune_sharded_checkpoints(directory: Path, keep_last: int, newest: Path) -> None:
    """Delete sharded checkpoints older than ``newest`` so that ``keep_last`` remain, and the partial or
    replaced directories of saves that did not finish."""
    newest_step = int(_DIR_NAME.match(newest.name).group(1))
    older = [path for step, path in list_sharded_checkpoints(directory) if step < newest_step]
    for path in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(path)
        _log.info("deleted old checkpoint %s (keep_last=%d)", path, keep_last)
    for leftover in list(directory.glob(f"{_TMP_PREFIX}*{_PARTIAL_SUFFIX}")) + list(directory.glob(f"{_TMP_PREFIX}*.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
        _log.info("removed %s, left by a save that did not finish", leftover)


def _replace_dir(source: Path, target: Path) -> None:
    """Rename the directory ``source`` to ``target``; an existing ``target`` (a stale checkpoint at the same
    step, e.g. one that did not load) is moved aside first and deleted after."""
    if not target.exists():
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def _refuse_newer_other_layout(directory, own: list, other: list, layout: str) -> None:
    """Resuming must not silently skip newer checkpoints that another strategy wrote."""
    if not other or (own and own[-1][0] >= other[-1][0]):
        return
    step, path = other[-1]
    if layout == "file":
        raise CheckpointError(
            f"{directory} holds a sharded (FSDP) checkpoint at step {step} ({path.name}) newer than any single-file one; "
            "this run (distributed.strategy=ddp/zero1) cannot read it: resume with distributed.strategy=fsdp, or move "
            "it away to resume from an older single-file checkpoint")
    raise CheckpointError(
        f"{directory} holds a single-file checkpoint at step {step} ({path.name}) newer than any sharded one; this run "
        "(distributed.strategy=fsdp) cannot read it: resume with distributed.strategy=ddp or zero1, or move it away")


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
