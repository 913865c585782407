"""Training logs: ``metrics.jsonl``, TensorBoard scalars and the progress shown on the console
(:mod:`~evamim.engine.progress`: a tqdm bar on a terminal, plain log lines otherwise).

Only the main process writes: every class here takes ``is_main_process`` and does nothing (not even a
device sync) when it is False. Which process is the main one is decided by the caller.

JSONL: one JSON object per line, ``{"step": ..., "epoch": ..., "lr": ..., "loss": ..., <metrics>,
"img_per_s": ..., "time": <unix seconds>}`` for training lines, and lines whose metric keys start with
``eval/`` for evaluations. TensorBoard: one scalar per key, tagged ``train/<key>`` or ``eval/<key>``,
at the global step.

On resume from step ``S`` (0 when the run died before its first checkpoint) both logs drop what was written
after ``S`` by the attempt that died (those steps are trained again), so the curves hold each step once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Mapping

import torch

from evamim import atomic
from evamim.engine.progress import Progress

_log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricAverager:
    """Sums of per-step metrics between two log steps; :meth:`compute` returns the means and resets.

    Values stay tensors on their device until :meth:`compute`, so adding them costs no device sync.
    A key missing from some steps is averaged over the steps that had it.
    """

    def __init__(self):
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1

    def compute(self) -> dict[str, float]:
        means = {key: float(total) / self._counts[key] for key, total in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return means


class Throughput:
    """Images per second and seconds per step since the last :meth:`compute`."""

    def __init__(self):
        self._images = 0
        self._steps = 0
        self._since = time.perf_counter()

    def add(self, images: int) -> None:
        self._images += images
        self._steps += 1

    def compute(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        result = {"img_per_s": self._images / elapsed, "s_per_step": elapsed / max(self._steps, 1)}
        self._images, self._steps, self._since = 0, 0, now
        return result


class MetricsLogger:
    """Writes log records to ``<out_dir>/metrics.jsonl`` and ``<out_dir>/tensorboard/``, and drives the
    console progress (total = ``total_steps``, starting at ``start_step``, so its ETA covers the rest of the
    run): with ``progress_bar``, a tqdm bar when stderr is a terminal, otherwise one log line per training
    record (:class:`~evamim.engine.progress.Progress`).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        is_main_process: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress_bar: bool = True,
    ):
        self.enabled = is_main_process
        self.out_dir = Path(out_dir)
        self._jsonl = None
        self._tb = None
        self._progress = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path = self.out_dir / JSONL_NAME
        # Also at step 0: a run killed before its first checkpoint starts over, and so does its log.
        drop_records_after(jsonl_path, start_step)
        self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is heavy to import; only the writer needs it

            # purge_step hides events at or after it that an earlier attempt wrote past where this one starts.
            self._tb = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        self._progress = Progress(enabled=progress_bar, total_steps=total_steps, start_step=start_step)

    def log(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        """Write one record. ``values`` are plain floats/ints; keys are written as given to JSONL
        (with ``eval/`` prepended when ``prefix == "eval"``) and as ``<prefix>/<key>`` to TensorBoard."""
        if not self.enabled:
            return
        keys = {key if prefix == "train" else f"{prefix}/{key}": value for key, value in values.items()}
        record = {"step": step, **keys, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, global_step=step)
            self._tb.flush()
        if self._progress is not None and prefix == "train":
            self._progress.report(step, values)

    def advance(self, steps: int = 1) -> None:
        """``steps`` more optimizer steps are done (moves the progress bar)."""
        if self._progress is not None:
            self._progress.advance(steps)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._progress = self._tb = self._jsonl = None


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (a JSONL log) without the records whose ``step`` is greater than ``step``.

    A torn last line (the process died mid-write) is dropped too. Rewritten atomically (:mod:`evamim.atomic`)
    so a crash here cannot lose the records that are kept.
    """
    if not path.exists():
        return
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("step", -math.inf) > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return
    atomic.write_text(path, "".join(kept))
    _log.info("dropped %d records after step %d from %s (resumed run)", dropped, step, path)
