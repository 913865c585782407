"""Counting bad samples across workers and stopping a run when too many fail.

Workers skip a bad sample and report its ``path: reason`` line next to the next batch (never inside
it: see ``evamim.data.collate.LoaderCollate``); the loader feeds each batch's count and failures to
``BadSampleMonitor``, which logs every failure and raises ``TooManyBadSamples`` when the recent
failure fraction is too high.
"""

from __future__ import annotations

import collections
import logging

logger = logging.getLogger("evamim.data")

MAX_REMEMBERED = 100_000  # failure lines remembered to warn only once each (bounds the memory)


class TooManyBadSamples(RuntimeError):
    """More than ``max_bad_fraction`` of the recently tried samples failed to load."""


class BadSampleMonitor:
    """Sliding-window failure fraction over the samples tried, judged after a minimum count.

    The window is kept at batch granularity: it holds the most recent batches whose tried samples
    add up to about ``window``. A fraction is only judged once the window holds ``min_samples``
    tried samples, so one bad file at the very start of a run cannot stop it; a corrupt region
    met late in a long run is still caught because old, clean batches leave the window.
    """

    def __init__(self, max_fraction: float, window: int = 10_000, min_samples: int = 1_000):
        self.max_fraction = max_fraction
        self.window = max(1, window)
        self.min_samples = max(1, min_samples)
        self.total_tried = 0
        self.total_bad = 0
        self._recent: collections.deque[tuple[int, int]] = collections.deque()
        self._recent_tried = 0
        self._recent_bad = 0
        self._last_failures: collections.deque[str] = collections.deque(maxlen=5)
        self._reported: set[str] = set()

    def update(self, num_good: int, failures: list[str]) -> None:
        """Record one batch: ``num_good`` samples delivered, ``failures`` the ``path: reason`` lines.

        Raises:
            TooManyBadSamples: when the window holds at least ``min_samples`` tried samples and
                more than ``max_fraction`` of them failed.
        """
        for failure in failures:
            # Map-style data meets the same bad file every epoch: warn once, then only at debug level.
            if failure in self._reported:
                logger.debug("skipped bad sample %s (again)", failure)
            else:
                logger.warning("skipped bad sample %s", failure)
                if len(self._reported) < MAX_REMEMBERED:
                    self._reported.add(failure)
            self._last_failures.append(failure)
        tried, bad = num_good + len(failures), len(failures)
        self.total_tried += tried
        self.total_bad += bad
        self._recent.append((tried, bad))
        self._recent_tried += tried
        self._recent_bad += bad
        while self._recent_tried - self._recent[0][0] >= self.window:
            old_tried, old_bad = self._recent.popleft()
            self._recent_tried -= old_tried
            self._recent_bad -= old_bad
        self._check()

    @property
    def recent_fraction(self) -> float:
        return self._recent_bad / self._recent_tried if self._recent_tried else 0.0

    def _check(self) -> None:
        if self._recent_tried < self.min_samples or self.recent_fraction <= self.max_fraction:
            return
        last = "\n  ".join(self._last_failures)
        raise TooManyBadSamples(
            f"{self._recent_bad} of the last {self._recent_tried} samples failed to load "
            f"({self.recent_fraction:.1%} > data.max_bad_fraction {self.max_fraction:.1%}); "
            f"{self.total_bad} of {self.total_tried} since the loader started. Most recent failures:\n  {last}\n"
            "Fix or remove these files (`evamim data inspect PATH` lists them), or raise data.max_bad_fraction."
        )

    def summary(self) -> dict[str, float]:
        """Totals since the loader started: tried, bad, and the overall fraction."""
        fraction = self.total_bad / self.total_tried if self.total_tried else 0.0
        return {"tried": self.total_tried, "bad": self.total_bad, "bad_fraction": fraction}
