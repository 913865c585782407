"""A distributed sampler for map-style datasets that resumes mid-epoch exactly.

Epoch ``e`` uses one global order of the dataset, a permutation seeded by ``(seed, e)`` (identity
without shuffle), padded by wrapping around to a multiple of the world size (``pad=True``, so all
ranks see equally many samples) or not padded (``pad=False``, for evaluation). Rank ``r`` takes
the positions ``r, r + world, r + 2 world, ...``.

Resuming: after each rank consumed ``c`` samples, the global *position* is ``c * world``: every
position below it was consumed by some rank, none above. ``set_epoch(e, position)`` makes rank
``r`` take positions ``position + r, position + r + world, ...`` -- exactly the rest of the epoch,
nothing repeated, nothing skipped. The position is global, so a run may even resume on another
number of ranks (the remaining positions are redistributed).

The sampler yields ``(epoch, index)`` pairs: the dataset learns the epoch of each sample from the
sampler itself, which stays correct with persistent workers (whose dataset copies never see
attribute changes made in the main process).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for this rank's share of the epoch, from a resumable position."""

    def __init__(
        self,
        size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        pad: bool = True,
    ):
        if size < 1:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.position = 0

    @property
    def total_size(self) -> int:
        """Positions in one epoch over all ranks (padded to a multiple of the world size)."""
        if self.pad:
            return -(-self.size // self.world_size) * self.world_size
        return self.size

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Start ``epoch`` at global ``position`` (samples consumed by all ranks together)."""
        if not 0 <= position <= self.total_size:
            raise ValueError(f"position {position} is outside epoch [0, {self.total_size}]")
        self.epoch = epoch
        self.position = position

    def order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch``: ``total_size`` dataset indices."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        if self.total_size > self.size:
            order = np.resize(order, self.total_size)  # wraps around: the first few repeat
        return order

    def rank_indices(self) -> np.ndarray:
        """This rank's remaining dataset indices of the current epoch, in order."""
        return self.order(self.epoch)[self.position + self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.rank_indices().tolist():
            yield epoch, index

    def __len__(self) -> int:
        return len(range(self.position + self.rank, self.total_size, self.world_size))

    def samples_per_epoch(self) -> int:
        """This rank's samples in a whole epoch."""
        return len(range(self.rank, self.total_size, self.world_size))
