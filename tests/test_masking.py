"""Mask generators: BEiT/EVA block masking against a faithful port of the official generator, MAE random masking."""

import math
import random

import numpy as np
import pytest
import torch

import evamim
from evamim.pretrain.masking import AlternatingMasking, BlockMasking, RandomMasking

DRAWS = 2000


class OfficialMaskingGenerator:
    """The BEiT / EVA-01 ``MaskingGenerator``, line for line (``np.int`` -> ``int``), on a seeded ``random.Random``."""

    def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None, seed=0):
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.random = random.Random(seed)

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for attempt in range(10):
            target_area = self.random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.random.randint(0, self.height - h)
                left = self.random.randint(0, self.width - w)

                num_masked = mask[top: top + h, left: left + w].sum()
                # Overlap
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=(self.height, self.width), dtype=int)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)

            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta

        return mask


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a 2-D bool mask."""
    seen = np.zeros_like(mask, dtype=bool)
    sizes = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            size += 1
            for ni, nj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= ni < height and 0 <= nj < width and mask[ni, nj] and not seen[ni, nj]:
                    seen[ni, nj] = True
                    stack.append((ni, nj))
        sizes.append(size)
    return sizes


def _smallest_block(min_num_patches: int, min_aspect: float) -> int:
    """Smallest rectangle h*w the generator can draw for a target area >= min_num_patches (rounding shrinks it)."""
    smallest = min_num_patches
    for area in np.linspace(min_num_patches, min_num_patches + 1, 21):
        for log_aspect in np.linspace(math.log(min_aspect), -math.log(min_aspect), 1201):
            aspect = math.exp(log_aspect)
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            smallest = min(smallest, h * w)
    return smallest


@pytest.fixture(scope="module")
def eva_masks() -> np.ndarray:
    return BlockMasking(grid=(16, 16), num_masking_patches=105)(DRAWS, rng=0).numpy()


@pytest.fixture(scope="module")
def official_masks() -> np.ndarray:
    generator = OfficialMaskingGenerator((16, 16), 105, min_num_patches=16, seed=0)
    return np.stack([generator().reshape(-1).astype(bool) for _ in range(DRAWS)])


def test_public_names():
    assert evamim.BlockMasking is BlockMasking
    assert evamim.RandomMasking is RandomMasking


def test_block_masks_shape_dtype_and_budget(eva_masks):
    masks = BlockMasking(grid=(16, 16))(4, rng=0)
    assert masks.dtype == torch.bool and masks.shape == (4, 256)
    counts = eva_masks.sum(1)
    assert counts.max() <= 105
    assert counts.min() > 0
    assert len(np.unique(counts)) > 1, "the count per image must vary"


def test_block_masking_matches_official_generator(eva_masks, official_masks):
    ours, reference = eva_masks.sum(1), official_masks.sum(1)
    print(f"\nmean masked patches per image over {DRAWS} draws (16x16, budget 105): "
          f"evamim {ours.mean():.3f} (std {ours.std():.3f}), official {reference.mean():.3f} (std {reference.std():.3f})")
    # The per-image std is ~1.05, so the standard error of the difference of means is ~0.033.
    assert abs(ours.mean() - reference.mean()) < 0.2
    assert abs(ours.std() - reference.std()) < 0.3
    # Where blocks land: the border ring of the grid is masked less often than the centre.
    def border_rate(masks):
        grid = masks.reshape(-1, 16, 16)
        ring = np.ones((16, 16), bool)
        ring[1:-1, 1:-1] = False
        return grid[:, ring].mean()
    assert abs(border_rate(eva_masks) - border_rate(official_masks)) < 0.02
    ours_blocks = np.mean([len(_components(m.reshape(16, 16))) for m in eva_masks[:500]])
    reference_blocks = np.mean([len(_components(m.reshape(16, 16))) for m in official_masks[:500]])
    assert abs(ours_blocks - reference_blocks) < 0.25


def test_block_masks_are_made_of_blocks(eva_masks):
    smallest = _smallest_block(16, 0.3)
    assert smallest == 12  # e.g. 6x2 for a target area of 16 and aspect ~2.6
    for mask in eva_masks:
        sizes = _components(mask.reshape(16, 16))
        small = [size for size in sizes if size < smallest]
        # A component smaller than any block drawn with a full budget can only come from blocks placed
        # once fewer than 16 patches of budget were left: they add at most 15 patches, all after the
        # first 90 were masked.
        assert sum(small) <= 15
        if small:
            assert mask.sum() - sum(small) >= 105 - 15


def test_block_masking_is_seeded():
    generator = BlockMasking(grid=(16, 16))
    assert torch.equal(generator(8, rng=123), generator(8, rng=123))
    assert torch.equal(generator(8, rng=np.random.default_rng(5)), generator(8, rng=np.random.default_rng(5)))
    assert not torch.equal(generator(8, rng=1), generator(8, rng=2))
    stream = np.random.default_rng(0)
    first, second = generator(8, rng=stream), generator(8, rng=stream)
    assert not torch.equal(first, second), "a Generator must advance between calls"
    assert generator(8).shape == (8, 256)  # rng=None: fresh OS entropy


def test_block_masking_scales_budget_with_grid():
    generator = BlockMasking(grid=(14, 14))
    assert generator.num_masking_patches == 80  # floor(105 / 256 * 196 + 0.5)
    masks = generator(500, rng=0).numpy()
    assert masks.shape == (500, 196)
    assert masks.sum(1).max() <= 80
    reference = OfficialMaskingGenerator((14, 14), 80, min_num_patches=16, seed=0)
    reference_mean = np.mean([reference().sum() for _ in range(500)])
    assert abs(masks.sum(1).mean() - reference_mean) < 0.4
    assert BlockMasking(grid=16).num_masking_patches == 105
    assert BlockMasking(grid=(16, 16), mask_ratio=0.5).num_masking_patches == 128
    assert BlockMasking(grid=(4, 6), num_masking_patches=9, min_num_patches=4)(3, rng=0).sum(1).max() <= 9


def test_block_masking_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        BlockMasking(grid=16, num_masking_patches=10, mask_ratio=0.4)
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMasking(grid=4, num_masking_patches=17)
    with pytest.raises(ValueError, match="mask_ratio"):
        BlockMasking(grid=4, mask_ratio=1.5)
    with pytest.raises(ValueError, match="grid"):
        BlockMasking(grid=(0, 4))
    with pytest.raises(TypeError, match="rng"):
        BlockMasking(grid=16)(2, rng="seed")
    assert BlockMasking(grid=4, num_masking_patches=0)(2, rng=0).sum() == 0
    with pytest.raises(ValueError, match="min_num_patches"):
        BlockMasking(grid=4)  # budget 7 < 16: most images would get no mask


def test_block_masking_on_small_grids_with_small_blocks():
    masks = BlockMasking(grid=4, min_num_patches=3)(500, rng=0).sum(1)
    assert masks.max() <= 7 and masks.min() > 0 and masks.float().mean() > 6.5


def test_random_masking_exact_count_and_seeded():
    generator = RandomMasking(grid=(14, 14), mask_ratio=0.75)
    masks = generator(64, rng=0)
    assert masks.dtype == torch.bool and masks.shape == (64, 196)
    assert generator.num_masked == 196 - int(196 * 0.25) == 147
    assert (masks.sum(1) == 147).all()
    assert torch.equal(masks, generator(64, rng=0))
    assert not torch.equal(masks, generator(64, rng=1))
    # Uniform over positions: each patch is masked about 75 % of the time.
    frequency = generator(2000, rng=3).float().mean(0)
    assert (frequency - 0.75).abs().max() < 0.06


def test_alternating_masking_is_fixed():
    masks = AlternatingMasking(grid=(4, 4))(3)
    assert masks.shape == (3, 16)
    assert masks[:, ::2].all() and not masks[:, 1::2].any()
