"""A training run's progress on the console: a tqdm bar when stderr is a terminal, plain log lines otherwise.

Without a terminal (SLURM logs, CI) a bar prints either nothing useful or a stream of carriage-return
updates; there, one line per log step reads well in a file and costs nothing::

    step 500/10000 (5.0%)  epoch 1  loss 0.8123  lr 1.50e-04  img/s 812.3  ETA 2:03:04

Evaluations get one line each, whatever the console (:func:`format_eval_line`)::

    eval step 500 (epoch 1): top1 81.20  top5 95.10  loss 0.812

Lines go through :mod:`logging` (logger ``evamim.engine.progress``, level INFO), so they reach the console,
with timestamps, wherever the application sends its logs. Only the main process shows progress: the
caller decides which one that is.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Mapping

_log = logging.getLogger(__name__)


def stderr_is_terminal() -> bool:
    """True when stderr (where tqdm draws) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def format_number(value: float) -> str:
    """A metric for people: two decimals from 10 up (``81.20``), four significant digits below (``0.8123``)."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, with days in front past 24 hours (``2d 3:04:05``); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def format_progress_line(step: int, total_steps: int, values: Mapping[str, float], eta_seconds: float) -> str:
    """``step 500/10000 (5.0%)  epoch 1  loss 0.8123  lr 1.50e-04  img/s 812.3  ETA 2:03:04``; ``values`` is a
    training log record (``epoch``, ``loss``, ``lr``, ``img_per_s``); a missing entry is left out (e.g. no loss
    when every step of the interval was skipped)."""
    parts = [f"step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)"]
    if "epoch" in values:
        parts.append(f"epoch {values['epoch']}")
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4g}")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2e}")
    if "img_per_s" in values:
        parts.append(f"img/s {values['img_per_s']:.1f}")
    parts.append(f"ETA {format_duration(eta_seconds)}")
    return "  ".join(parts)


def format_eval_line(step: int, metrics: Mapping[str, float], epoch: int | None = None) -> str:
    """``eval step 500 (epoch 1): top1 81.20  top5 95.10  loss 0.812``, the metrics in the order given."""
    where = f"eval step {step}" + (f" (epoch {epoch})" if epoch is not None else "")
    shown = "  ".join(f"{key} {format_number(value)}" for key, value in metrics.items())
    return f"{where}: {shown}" if shown else f"{where}: no metrics"


class Progress:
    """Shows the progress of steps ``start_step + 1 .. total_steps``: a tqdm bar on a terminal, else a log line
    at each :meth:`report`. With ``enabled=False`` it shows nothing.

    The ETA of a line extrapolates the mean pace since this object was made (evaluations and checkpoints
    included, so it is the time the rest of the run will really take, not the pure step time).
    """

    def __init__(self, *, enabled: bool, total_steps: int, start_step: int = 0, terminal: bool | None = None):
        self.total_steps = total_steps
        self.start_step = start_step
        self._bar = None
        self._redirect = None
        self._lines = False
        self._started = time.perf_counter()
        if not enabled:
            return
        if stderr_is_terminal() if terminal is None else terminal:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
            # Log lines (evaluations, checkpoints) are printed above the bar instead of tearing it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        else:
            self._lines = True

    @property
    def mode(self) -> str | None:
        """``"bar"``, ``"lines"`` or None (nothing shown)."""
        return "bar" if self._bar is not None else "lines" if self._lines else None

    def advance(self, steps: int = 1) -> None:
        """``steps`` more optimizer steps are done (moves the bar)."""
        if self._bar is not None:
            self._bar.update(steps)

    def report(self, step: int, values: Mapping[str, float]) -> None:
        """At a log step: the bar shows loss, lr and img/s of ``values`` (a training log record); without a
        terminal, one line with the step, epoch, loss, lr, img/s and ETA is logged."""
        if self._bar is not None:
            self._bar.set_postfix(_bar_fields(values), refresh=False)
        elif self._lines:
            done = step - self.start_step
            elapsed = time.perf_counter() - self._started
            eta = (self.total_steps - step) * elapsed / done if done > 0 else math.nan
            _log.info("%s", format_progress_line(step, self.total_steps, values, eta))

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        if self._bar is not None:
            self._bar.close()
        self._bar = self._redirect = None
        self._lines = False


def _bar_fields(values: Mapping[str, float]) -> dict[str, str]:
    fields = {}
    if "loss" in values:
        fields["loss"] = f"{values['loss']:.4g}"
    if "lr" in values:
        fields["lr"] = f"{values['lr']:.3g}"
    if "img_per_s" in values:
        fields["img/s"] = f"{values['img_per_s']:.1f}"
    return fields
