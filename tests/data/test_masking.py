"""Block masks (engine/data/masking.py): ratio bounds, counts, shapes, seeding, token indices and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ibot_engine.config import MaskConfig
from ibot_engine.data.masking import (
    block_mask,
    dinov2_masks,
    generate_masks,
    masked_token_indices,
    official_masks,
    seeded_rng,
)

GRID = (14, 14)  # 224 px / patch 16, the grid the official minimum block (16 patches) is defined on
N = GRID[0] * GRID[1]


def _fractions(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(len(masks), -1).mean(1)


@pytest.mark.parametrize("target", [0, 5.5, 19.6, 60, 98])
def test_block_mask_never_overshoots_target(target: float) -> None:
    for seed in range(50):
        mask = block_mask(seeded_rng(seed), *GRID, target, min_block=16, max_block=N, aspect_min=0.3)
        assert mask.shape == GRID
        assert mask.dtype == bool
        assert mask.sum() <= target


def test_official_probability_and_ratio_bounds() -> None:
    cfg = MaskConfig(variant="official", probability=0.5, ratio_min=0.1, ratio_max=0.5)
    masks = official_masks(cfg, GRID, seed=0, epoch=0, indices=range(1000), num_views=2)
    assert masks.shape == (2000, *GRID)
    assert masks.dtype == bool
    fractions = _fractions(masks)
    masked = fractions[fractions > 0]
    # Each crop is masked independently with p = 0.5: 2000 draws give 1000 +- 22 (1 sigma).
    assert 0.45 < len(masked) / len(fractions) < 0.55
    # The generator never exceeds r * h * w and r <= ratio_max.
    assert fractions.max() <= 0.5
    # It can undershoot (a round that places nothing stops it), but on average it is close to E[r] = 0.3,
    # and at 14x14 no masked crop is below one 16-patch block's worth minus rounding.
    assert 0.27 < masked.mean() <= 0.31
    assert masked.min() >= 12 / N
    # The ratio is uniform over the range: both ends are populated.
    assert (masked < 0.15).mean() > 0.05
    assert (masked > 0.45).mean() > 0.05


def test_official_min_block_default_and_override() -> None:
    # With the default, a block is at least (14 // 3) ** 2 = 16 patches (within rounding), so a low target
    # gives one block of 16..19 patches; forcing min_block_patches = 1 allows single patches.
    cfg = MaskConfig(probability=1.0, ratio_min=0.1, ratio_max=0.1)
    masks = official_masks(cfg, GRID, seed=3, epoch=0, indices=range(200), num_views=1)
    counts = masks.reshape(200, -1).sum(1)
    assert counts.max() <= 19
    assert np.median(counts) >= 14
    small = official_masks(
        MaskConfig(probability=1.0, ratio_min=0.01, ratio_max=0.01, min_block_patches=1),
        GRID,
        seed=3,
        epoch=0,
        indices=range(50),
        num_views=1,
    )
    assert set(small.reshape(50, -1).sum(1).tolist()) <= {0, 1}


def test_official_is_per_sample_and_view() -> None:
    cfg = MaskConfig(probability=0.5)
    whole = official_masks(cfg, GRID, seed=7, epoch=2, indices=[10, 11, 12, 13], num_views=2)
    # The same sample gets the same masks whatever batch it is in and wherever (world-size independence).
    part = official_masks(cfg, GRID, seed=7, epoch=2, indices=[13, 11], num_views=2)
    np.testing.assert_array_equal(part[[0, 2]], whole[[3, 7]])
    np.testing.assert_array_equal(part[[1, 3]], whole[[1, 5]])
    again = official_masks(cfg, GRID, seed=7, epoch=2, indices=[10, 11, 12, 13], num_views=2)
    np.testing.assert_array_equal(again, whole)
    many = official_masks(cfg, GRID, seed=7, epoch=2, indices=range(64), num_views=2)
    for other in (
        official_masks(cfg, GRID, seed=8, epoch=2, indices=range(64), num_views=2),
        official_masks(cfg, GRID, seed=7, epoch=3, indices=range(64), num_views=2),
    ):
        assert not np.array_equal(other, many)
    # The two views of a sample are drawn independently.
    assert not np.array_equal(many[:64], many[64:])


@pytest.mark.parametrize(("num_crops", "probability"), [(128, 0.5), (33, 0.5), (16, 0.25), (8, 1.0)])
def test_dinov2_exact_count_and_stratified_ratios(num_crops: int, probability: float) -> None:
    cfg = MaskConfig(variant="dinov2", probability=probability, ratio_min=0.1, ratio_max=0.5)
    num_masked = int(num_crops * probability)
    bounds = np.linspace(0.1, 0.5, num_masked + 1)
    for batch in range(5):
        masks = dinov2_masks(cfg, GRID, seed=0, epoch=1, batch=batch, rank=0, num_crops=num_crops)
        assert masks.shape == (num_crops, *GRID)
        fractions = np.sort(_fractions(masks))
        assert (fractions > 0).sum() == num_masked
        # Crop i of the masked ones targets int(N * U(p_i, p_i+1)) and never overshoots; max block 0.5 N.
        assert np.all(fractions[num_crops - num_masked :] <= bounds[1:] + 1e-9)
        assert fractions.max() <= 0.5


def test_dinov2_seeding_and_shuffle() -> None:
    cfg = MaskConfig(variant="dinov2")
    kwargs = {"seed": 0, "epoch": 0, "batch": 3, "num_crops": 64}
    masks = dinov2_masks(cfg, GRID, rank=0, **kwargs)
    np.testing.assert_array_equal(masks, dinov2_masks(cfg, GRID, rank=0, **kwargs))
    assert not np.array_equal(masks, dinov2_masks(cfg, GRID, rank=1, **kwargs))
    assert not np.array_equal(masks, dinov2_masks(cfg, GRID, rank=0, **{**kwargs, "batch": 4}))
    # The masked crops are spread over the batch, not the first half.
    masked = _fractions(masks) > 0
    assert 0 < masked[:32].sum() < 32


@pytest.mark.parametrize("variant", ["official", "dinov2"])
def test_generate_masks_tensor_and_token_indices(variant: str) -> None:
    cfg = MaskConfig(variant=variant)
    grid = (8, 8)
    masks = generate_masks(cfg, grid, seed=1, epoch=0, batch=0, rank=0, indices=list(range(16)), num_views=2)
    assert masks.shape == (32, 8, 8)
    assert masks.dtype == torch.bool
    mask_indices, mask_weights = masked_token_indices(masks)
    assert mask_indices.dtype == torch.int64
    assert mask_weights.dtype == torch.float32
    torch.testing.assert_close(mask_indices, masks.flatten().nonzero().flatten())
    assert mask_indices.shape == mask_weights.shape
    counts = masks.flatten(1).sum(1)
    image_of_token = mask_indices // 64
    torch.testing.assert_close(mask_weights, 1.0 / counts[image_of_token].float())
    # Weights of each masked image sum to one; unmasked images contribute no tokens.
    per_image = torch.zeros(32).index_add_(0, image_of_token, mask_weights)
    torch.testing.assert_close(per_image, (counts > 0).float())


def test_token_indices_of_empty_masks() -> None:
    mask_indices, mask_weights = masked_token_indices(torch.zeros(4, 3, 3, dtype=torch.bool))
    assert mask_indices.shape == (0,)
    assert mask_weights.shape == (0,)
