"""Iterating the training data across epochs, and saving/restoring the position in it.

The data-position protocol (what the training loop expects of the ``data`` it is given):

1. ``iter(data)`` yields the batches of one epoch; when it is exhausted the loop calls ``iter(data)``
   again for the next epoch. That is all a plain iterable (a list, a ``DataLoader``) needs. Every tensor and
   list in a batch holds one entry per sample (``evamim.engine.batching`` refuses any other length when it
   counts or splits a batch); a data source keeps its own bookkeeping out of the batches (see 4).
2. Optional ``data.set_epoch(epoch: int)``: called before each epoch's ``iter(data)`` (the
   ``DistributedSampler`` convention), so the shuffle order can be a function of the epoch.
3. Optional, for exact resume mid-epoch, ``data.state_dict() -> dict`` and ``data.load_state_dict(dict)``
   (torchdata's ``StatefulDataLoader`` has both). ``state_dict()`` describes the position *after the last
   batch the loop received* and holds only plain types and tensors; after ``load_state_dict(state)`` the
   next ``iter(data)`` yields the rest of that epoch, and later ``iter`` calls the following epochs. Such
   data owns its epoch counter: the loop does not call ``set_epoch`` on it.

4. Optional ``data.bad_sample_totals() -> dict[str, int]``: this process's counters of samples tried and
   skipped as unreadable since the run started (resume included). The loop sums them over the processes and
   logs them with every training record and in its result, so a run's skipped samples are on the record.

Data without ``state_dict`` is resumed by replaying: the loop calls ``set_epoch(epoch)`` (if present)
and ``iter(data)``, then discards the batches consumed before the checkpoint (logged, with the count).
That reproduces the position when the epoch's order depends only on the epoch, and costs the time to
load those batches.

The loop's own position, ``(epoch, batches consumed in that epoch)``, is saved in every checkpoint in
both cases and used for the ``epoch`` in the logs.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

from evamim.engine.checkpoint import capture_rng_state, restore_rng_state

_log = logging.getLogger(__name__)


def is_stateful(data: Any) -> bool:
    return callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))


class DataCursor:
    """Yields batches forever across epochs and tracks ``epoch`` and ``batches_in_epoch``."""

    def __init__(self, data: Iterable):
        self.data = data
        self.stateful = is_stateful(data)
        self.epoch = 0
        self.batches_in_epoch = 0
        self._iterator: Iterator | None = None
        self._replay = 0  # batches to discard from the next iterator (stateless resume)

    def next(self) -> Any:
        """The next batch, starting a new epoch when the current one is exhausted."""
        if self._iterator is None:
            self._iterator = self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.batches_in_epoch == 0:
                raise RuntimeError(f"the training data yielded no batches in epoch {self.epoch}") from None
            self.epoch += 1
            self.batches_in_epoch = 0
            self._iterator = self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise RuntimeError(f"the training data yielded no batches in epoch {self.epoch}") from None
        self.batches_in_epoch += 1
        return batch

    def _start_epoch(self) -> Iterator:
        if not self.stateful and callable(getattr(self.data, "set_epoch", None)):
            self.data.set_epoch(self.epoch)
        if not self._replay:
            return iter(self.data)
        _log.warning(
            "the data has no state_dict(); replaying %d batches of epoch %d to reach the checkpoint's position "
            "(exact only if the order within an epoch depends on the epoch alone)", self._replay, self.epoch)
        # Replaying may draw from the global RNGs (a sampler seeding itself, random augmentation); the
        # training steps after it must see the RNG state the checkpoint restored, as the original run did.
        rng = capture_rng_state()
        iterator = iter(self.data)
        for index in range(self._replay):
            try:
                next(iterator)
            except StopIteration:
                raise RuntimeError(
                    f"the checkpoint is {self._replay} batches into epoch {self.epoch}, but the data has only "
                    f"{index} batches per epoch now; did the data or batch size change?") from None
        restore_rng_state(rng)
        self._replay = 0
        return iterator

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "data": self.data.state_dict() if self.stateful else None,
        }

    def load_state_dict(self, state: dict) -> None:
        saved_data = state["data"]
        if self.stateful and saved_data is None:
            raise ValueError(
                "the checkpoint has no data state (its data had no state_dict()), but this run's data is resumable; "
                "resume with the same kind of data, or start a new run directory")
        if not self.stateful and saved_data is not None:
            raise ValueError(
                f"the checkpoint holds a data state, but this run's data ({type(self.data).__name__}) has no "
                "load_state_dict(); resume with the same kind of data")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self._iterator = None
        if self.stateful:
            self.data.load_state_dict(saved_data)
        else:
            self._replay = self.batches_in_epoch
