"""Mask generators for masked image modeling.

Every generator is called as ``generator(batch_size, rng) -> torch.BoolTensor (B, H*W)``:

- ``True`` = masked (the student sees the mask token there and must predict the target).
- Patches are flattened in row-major order of the (H, W) patch grid, the same order as the
  student's patch tokens (``EvaViT.forward_features(images, mask=masks)``).
- ``rng`` is a ``numpy.random.Generator``, an int seed, or None (fresh OS entropy). Generators touch
  no global random state, so the same seed always gives the same masks; pass a Generator to draw
  successive batches from one stream (it is advanced in place).

Masks are meant to be made in the data loader's collate step, on the CPU, off the accelerator's
critical path.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# EVA / BEiT: 105 of the 256 patches of a 16x16 grid (about 40 %).
DEFAULT_BLOCK_MASK_RATIO = 105 / 256


def _grid(grid: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid, (int, np.integer)):
        grid = (int(grid), int(grid))
    height, width = (int(v) for v in grid)
    if height < 1 or width < 1:
        raise ValueError(f"grid must be positive (height, width) in patches, got {tuple(grid)}")
    return height, width


def _rng(rng) -> np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer, np.random.Generator, np.random.SeedSequence)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) != batch_size or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    return int(batch_size)


def _budget(num_patches: int, num_masking_patches: int | None, mask_ratio: float | None, default_ratio: float) -> int:
    """Number of patches to mask, from an explicit count or a ratio (rounded to nearest, halves up)."""
    if num_masking_patches is not None and mask_ratio is not None:
        raise ValueError(
            f"give num_masking_patches ({num_masking_patches}) or mask_ratio ({mask_ratio}), not both"
        )
    if num_masking_patches is None:
        ratio = default_ratio if mask_ratio is None else float(mask_ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {ratio}")
        num_masking_patches = math.floor(ratio * num_patches + 0.5)
    if int(num_masking_patches) != num_masking_patches or not 0 <= num_masking_patches <= num_patches:
        raise ValueError(
            f"num_masking_patches must be an int in [0, {num_patches}] for a grid of {num_patches} patches, "
            f"got {num_masking_patches!r}"
        )
    return int(num_masking_patches)


class _UniformStream:
    """Uniform [0, 1) numbers drawn from ``rng`` in chunks: one numpy call per chunk instead of per number
    keeps the block generator's Python loop cheap. The draws stay a pure function of the rng state."""

    def __init__(self, rng: np.random.Generator, chunk: int = 512):
        self._rng = rng
        self._chunk = chunk
        self._values = rng.random(chunk).tolist()
        self._index = 0

    def next(self) -> float:
        if self._index == len(self._values):
            self._values = self._rng.random(self._chunk).tolist()
            self._index = 0
        value = self._values[self._index]
        self._index += 1
        return value

    def uniform(self, low: float, high: float) -> float:
        # Same formula as Python's random.uniform, so low > high works the same way (the official
        # generator relies on it when the remaining budget is below min_num_patches).
        return low + (high - low) * self.next()

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high], both ends included (like random.randint)."""
        return low + min(int(self.next() * (high - low + 1)), high - low)


class BlockMasking:
    """BEiT / EVA block-wise masking: rectangles of random area and aspect ratio until a budget is spent.

    A faithful port of the official ``MaskingGenerator`` (BEiT, used unchanged by EVA), without its
    ``np.int`` (removed in NumPy 1.24). For each image, repeatedly:

    1. ``max_block = min(budget - masked_so_far, max_num_patches)``;
    2. up to 10 attempts: draw a target area uniformly in ``[min_num_patches, max_block]`` (in
       ``[max_block, min_num_patches]`` once the remaining budget is smaller than ``min_num_patches``),
       a log-uniform aspect ratio in ``[min_aspect, max_aspect]``, ``h = round(sqrt(area * aspect))``,
       ``w = round(sqrt(area / aspect))``; if ``h < H`` and ``w < W``, place the rectangle uniformly at
       random and keep it if it masks at least one new patch and no more new patches than ``max_block``;
    3. stop when the budget is reached or 10 attempts added nothing.

    So an image has at most ``num_masking_patches`` masked patches, usually a few fewer, and the count
    varies from image to image: gather masked tokens with the boolean mask, never assume a fixed count.
    Rounding can make a block a little smaller than ``min_num_patches`` (e.g. a 6x2 block for a target
    area of 16).

    Args:
        grid: patch grid (H, W), or an int for a square grid. 16 for EVA-g/14 at 224 px.
        num_masking_patches: the per-image budget. Give this or ``mask_ratio``, not both.
        mask_ratio: the budget as a fraction of ``H * W``, rounded to the nearest integer (halves up).
            With neither given the ratio is 105/256, EVA's setting, so a 16x16 grid gets 105 patches,
            a 14x14 grid ``floor(0.41015625 * 196 + 0.5) = 80`` and a 4x4 grid 7.
        min_num_patches: smallest target area of a block (16 for EVA; not scaled with the grid). It must
            not exceed the budget: on small grids (e.g. 4x4 or 5x5, budgets 7 and 10) lower it.
        max_num_patches: largest block area; None = the remaining budget (EVA).
        min_aspect: smallest aspect ratio h/w of a block (0.3 for EVA).
        max_aspect: largest aspect ratio; None = ``1 / min_aspect``.
        fill_to_budget: after the blocks, mask patches drawn uniformly from the unmasked ones until every image
            has exactly the budget (for MAE-style encoders, which need the same count per image). Off for EVA.

    Call: ``masks = BlockMasking(grid=(16, 16))(batch_size, rng)`` -> ``torch.bool`` (B, H*W), True = masked.
    """

    def __init__(
        self,
        grid: int | Sequence[int] = (16, 16),
        num_masking_patches: int | None = None,
        mask_ratio: float | None = None,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        fill_to_budget: bool = False,
    ):
        self.height, self.width = _grid(grid)
        self.grid = (self.height, self.width)
        self.num_patches = self.height * self.width
        self.num_masking_patches = _budget(
            self.num_patches, num_masking_patches, mask_ratio, DEFAULT_BLOCK_MASK_RATIO
        )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if 0 < self.num_masking_patches < min_num_patches:
            # Blocks are drawn with areas >= min_num_patches and rejected when they exceed the budget, so
            # most images would end up with no mask at all (68 % on a 4x4 grid with the defaults).
            raise ValueError(
                f"the masking budget of {self.num_masking_patches} patches on a {self.height}x{self.width} grid is "
                f"smaller than min_num_patches={min_num_patches}, so most images would get no mask; lower "
                f"min_num_patches (e.g. to {max(1, self.num_masking_patches // 2)}) or raise the budget"
            )
        self.min_num_patches = min_num_patches
        if max_num_patches is not None and max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1 or None, got {max_num_patches}")
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.fill_to_budget = bool(fill_to_budget)

    def __repr__(self) -> str:
        return (
            f"BlockMasking(grid={self.grid}, num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=({self.min_aspect:.3g}, {self.max_aspect:.3g})"
            + (", filled to the budget)" if self.fill_to_budget else ")")
        )

    def _place_block(self, mask: np.ndarray, max_block: int, draws: _UniformStream) -> int:
        """One block, up to 10 attempts; returns the number of newly masked patches (0 = gave up)."""
        for _ in range(10):
            target_area = draws.uniform(self.min_num_patches, max_block)
            aspect_ratio = math.exp(draws.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = draws.randint(0, self.height - h)
                left = draws.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_block:
                    window[...] = True
                    return new
        return 0

    def _one(self, draws: _UniformStream) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_block = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._place_block(mask, max_block, draws)
            if delta == 0:
                break
            count += delta
        mask = mask.reshape(-1)
        if self.fill_to_budget and count < self.num_masking_patches:
            free = np.flatnonzero(~mask)
            # A partial Fisher-Yates shuffle of the free patches: the first `missing` are a uniform subset.
            for index in range(self.num_masking_patches - count):
                pick = draws.randint(index, len(free) - 1)
                free[index], free[pick] = free[pick], free[index]
            mask[free[: self.num_masking_patches - count]] = True
        return mask

    def __call__(self, batch_size: int, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        """(batch_size,) -> torch.bool (B, H*W), True = masked; per-image counts vary, each <= the budget
        (exactly the budget with ``fill_to_budget``)."""
        batch_size = _check_batch_size(batch_size)
        draws = _UniformStream(_rng(rng))
        masks = np.zeros((batch_size, self.num_patches), dtype=bool)
        for index in range(batch_size):
            masks[index] = self._one(draws)
        return torch.from_numpy(masks)


class RandomMasking:
    """MAE-style uniform random masking with the same count for every image.

    ``num_masked = H*W - int(H*W * (1 - mask_ratio))`` patches per image (MAE keeps
    ``int(L * (1 - ratio))`` tokens), chosen uniformly without replacement.

    Call: ``masks = RandomMasking(grid=(14, 14), mask_ratio=0.75)(batch_size, rng)`` ->
    ``torch.bool`` (B, H*W), True = masked, exactly ``num_masked`` True per row.
    """

    def __init__(self, grid: int | Sequence[int] = (14, 14), mask_ratio: float = 0.75):
        self.height, self.width = _grid(grid)
        self.grid = (self.height, self.width)
        self.num_patches = self.height * self.width
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.num_masked = self.num_patches - int(self.num_patches * (1.0 - self.mask_ratio))

    def __repr__(self) -> str:
        return f"RandomMasking(grid={self.grid}, mask_ratio={self.mask_ratio}, num_masked={self.num_masked})"

    def __call__(self, batch_size: int, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        """(batch_size,) -> torch.bool (B, H*W), True = masked, ``num_masked`` per row."""
        batch_size = _check_batch_size(batch_size)
        noise = _rng(rng).random((batch_size, self.num_patches))
        # The num_masked positions with the smallest noise are masked: a uniform random subset per row.
        order = np.argsort(noise, axis=1, kind="stable")[:, : self.num_masked]
        masks = np.zeros((batch_size, self.num_patches), dtype=bool)
        np.put_along_axis(masks, order, True, axis=1)
        return torch.from_numpy(masks)


class AlternatingMasking:
    """A fixed mask for validation losses: every other patch in row-major order (flat indices 0, 2, 4, ...)
    is masked, so the loss is comparable across evaluations. ``rng`` is accepted and ignored.

    Call: ``AlternatingMasking(grid)(batch_size)`` -> ``torch.bool`` (B, H*W), True = masked.
    """

    def __init__(self, grid: int | Sequence[int] = (16, 16)):
        self.height, self.width = _grid(grid)
        self.grid = (self.height, self.width)
        self.num_patches = self.height * self.width
        self.num_masked = (self.num_patches + 1) // 2

    def __repr__(self) -> str:
        return f"AlternatingMasking(grid={self.grid})"

    def __call__(self, batch_size: int, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        batch_size = _check_batch_size(batch_size)
        row = torch.zeros(self.num_patches, dtype=torch.bool)
        row[::2] = True
        return row.expand(batch_size, -1).clone()
