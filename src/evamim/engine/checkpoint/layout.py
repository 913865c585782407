"""Where training checkpoints live: the config, names, discovery and rotation (keep-last-k).

``<out_dir>/checkpoints/step-<9-digit step>.pt`` (a single file) or ``.../step-<9-digit step>/`` (a sharded
directory). The step is in the name, so discovery needs no ``latest`` pointer that could disagree with the
files. Hidden names (``.step-*``) are saves that did not finish: discovery ignores them and rotation removes them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

# Every checkpoint message shares one logger name, so one filter covers them.
_log = logging.getLogger("evamim.engine.checkpoint")

FORMAT = "evamim-train-checkpoint"
VERSION = 1
SUBDIR = "checkpoints"
TRAINER_FILE = "trainer.pt"
_NAME = re.compile(r"^step-(\d{9,})\.pt$")
_DIR_NAME = re.compile(r"^step-(\d{9,})$")
TMP_PREFIX = ".step-"
PARTIAL_SUFFIX = ".partial"


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


def sharded_checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}"


def _list_matching(directory: str | os.PathLike, pattern: re.Pattern, want_dir: bool) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = pattern.match(path.name)
        if match and (not want_dir or path.is_dir()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files in ``directory``, oldest first (temp files excluded)."""
    return _list_matching(directory, _NAME, want_dir=False)


def list_sharded_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the sharded checkpoint directories in ``directory``, oldest first."""
    return _list_matching(directory, _DIR_NAME, want_dir=True)


def any_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Every checkpoint in ``directory``, files and sharded directories."""
    return [path for _, path in list_checkpoints(directory) + list_sharded_checkpoints(directory)]


def prune_checkpoints(directory: Path, keep_last: int, newest: Path) -> None:
    """Delete checkpoints older than ``newest`` so that ``keep_last`` remain, counting ``newest``;
    remove leftover temp files of writers that were killed."""
    newest_step = int(_NAME.match(newest.name).group(1))
    older = [path for step, path in list_checkpoints(directory) if step < newest_step]
    for path in older[: max(len(older) - (keep_last - 1), 0)]:
        path.unlink()
        _log.info("deleted old checkpoint %s (keep_last=%d)", path, keep_last)
    for tmp in directory.glob(f"{TMP_PREFIX}*.tmp"):
        tmp.unlink(missing_ok=True)  # a concurrent unlinker is the only way it can vanish first
        _log.info("removed %s, left by a save that did not finish", tmp)


def prune_sharded_checkpoints(directory: Path, keep_last: int, newest: Path) -> None:
    """Delete sharded checkpoints older than ``newest`` so that ``keep_last`` remain, and the partial or
    replaced directories of saves that did not finish."""
    newest_step = int(_DIR_NAME.match(newest.name).group(1))
    older = [path for step, path in list_sharded_checkpoints(directory) if step < newest_step]
    for path in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(path)
        _log.info("deleted old checkpoint %s (keep_last=%d)", path, keep_last)
    for leftover in list(directory.glob(f"{TMP_PREFIX}*{PARTIAL_SUFFIX}")) + list(directory.glob(f"{TMP_PREFIX}*.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
        _log.info("removed %s, left by a save that did not finish", leftover)


def refuse_newer_other_layout(directory, own: list, other: list, layout: str) -> None:
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
