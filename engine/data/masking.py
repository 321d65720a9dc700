"""Block-wise masks for iBOT's masked image modelling, drawn on the CPU in the data collate.

Two variants (`mask.variant`; their draws differ as below, so say which one a result used), both built on the BEiT
block generator (`block_mask`):

* `official` (bytedance/ibot `loader.py: ImageFolderMask`): every global crop independently is masked with
  probability `mask.probability`, with a ratio r ~ U(ratio_min, ratio_max) of its h*w patches; the smallest
  block is (min(h, w) // 3) ** 2 patches (16 at 14x14) and blocks have no upper size bound. Draws are seeded
  per (run seed, epoch, sample index, view), so a sample gets the same masks whatever the world size, the
  number of workers or its position in the batch.
* `dinov2` (facebookresearch/dinov2 `data/collate.py`): over the G*B global crops of a rank's batch exactly
  int(G*B * probability) crops are masked, with stratified ratios (crop i of them draws U(p_i, p_{i+1}),
  p = linspace(ratio_min, ratio_max, n_masked + 1)), blocks of 4 to 0.5*h*w patches; the other crops are
  empty and the order is shuffled. Seeded per (run seed, epoch, global batch index, rank).

The generator places rectangles with pure-Python arithmetic and one numpy slice per attempt on an h x w grid
(14 x 14 at 224 px / patch 16), which costs microseconds per crop in a dataloader worker; no torch op runs
per attempt (its dispatch alone would cost more than the arithmetic), and nothing runs on the GPU.

Shapes: B images, G global views, h x w patch grid, M masked tokens of the whole batch.
    masks        [G*B, h, w] bool, view-major like the global crops (all B images of view 0, then view 1)
    mask_indices [M] int64, flat indices into masks.flatten() in nonzero() order
    mask_weights [M] float32, 1 / (masked count of the token's image)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ibot_engine.config import MaskConfig

# Attempts per round to place a block (BEiT, iBOT and DINOv2 all use 10).
_ATTEMPTS = 10
# Domain tags keep the random streams of different consumers of the same (seed, epoch, ...) key independent.
_TAG_OFFICIAL = 0x4F4D  # "OM"
_TAG_DINOV2 = 0x444D  # "DM"


def seeded_rng(*keys: int) -> np.random.Generator:
    """A numpy generator whose stream is a pure function of the non-negative integer `keys`."""
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def block_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_patches: float,
    *,
    min_block: float,
    max_block: float,
    aspect_min: float,
) -> np.ndarray:
    """BEiT block masking of about `num_patches` patches of an (height, width) grid.

    Repeats rounds until `num_patches` are masked; a round makes up to 10 attempts to place a rectangle of
    area ~ U(min_block, min(remaining, max_block)) with aspect ratio log-uniform in (aspect_min, 1 / aspect_min)
    and accepts the first that adds between 1 and `remaining` new patches. A round that adds nothing ends the
    loop, so the count can undershoot the target (never overshoot it).

    Returns:
        [height, width] bool array.
    """
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(aspect_min), -math.log(aspect_min))
    count = 0
    while count < num_patches:
        remaining = min(num_patches - count, max_block)
        delta = 0
        for _ in range(_ATTEMPTS):
            # a + (b - a) * U like random.uniform, which the reference code uses even when b < a
            # (a target below the minimum block still draws an area between the two).
            area = min_block + (remaining - min_block) * rng.random()
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= remaining:
                    block[...] = True  # a view of `mask`
                    delta = new
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask


def official_masks(
    cfg: MaskConfig,
    grid: tuple[int, int],
    *,
    seed: int,
    epoch: int,
    indices: Sequence[int],
    num_views: int,
) -> np.ndarray:
    """Official iBOT masks for `num_views` global crops of each sample in `indices`.

    Returns:
        [num_views * B, h, w] bool array, view-major.
    """
    height, width = grid
    min_block = cfg.min_block_patches or (min(height, width) // 3) ** 2
    masks = np.zeros((num_views, len(indices), height, width), dtype=bool)
    for view in range(num_views):
        for i, index in enumerate(indices):
            rng = seeded_rng(_TAG_OFFICIAL, seed, epoch, index, view)
            if rng.random() >= cfg.probability:
                continue
            ratio = cfg.ratio_min + (cfg.ratio_max - cfg.ratio_min) * rng.random()
            masks[view, i] = block_mask(
                rng,
                height,
                width,
                ratio * height * width,
                min_block=min_block,
                max_block=height * width,
                aspect_min=cfg.aspect_min,
            )
    return masks.reshape(num_views * len(indices), height, width)


def dinov2_masks(
    cfg: MaskConfig,
    grid: tuple[int, int],
    *,
    seed: int,
    epoch: int,
    batch: int,
    rank: int,
    num_crops: int,
) -> np.ndarray:
    """DINOv2 batch-stratified masks for the `num_crops` (= G*B) global crops of one rank's batch.

    Returns:
        [num_crops, h, w] bool array; which crops are masked is a shuffle, so any crop order is fine.
    """
    height, width = grid
    num_tokens = height * width
    min_block = cfg.min_block_patches or 4
    rng = seeded_rng(_TAG_DINOV2, seed, epoch, batch, rank)
    num_masked = int(num_crops * cfg.probability)
    bounds = np.linspace(cfg.ratio_min, cfg.ratio_max, num_masked + 1)
    masks = np.zeros((num_crops, height, width), dtype=bool)
    for i in range(num_masked):
        ratio = bounds[i] + (bounds[i + 1] - bounds[i]) * rng.random()
        masks[i] = block_mask(
            rng,
            height,
            width,
            int(num_tokens * ratio),
            min_block=min_block,
            max_block=0.5 * num_tokens,
            aspect_min=cfg.aspect_min,
        )
    return masks[rng.permutation(num_crops)]


def generate_masks(
    cfg: MaskConfig,
    grid: tuple[int, int],
    *,
    seed: int,
    epoch: int,
    batch: int,
    rank: int,
    indices: Sequence[int],
    num_views: int,
) -> Tensor:
    """Masks of the `num_views` global crops of a batch for `cfg.variant`.

    Args:
        cfg: masking config.
        grid: (h, w) patch grid of a global crop.
        seed: run seed (non-negative).
        epoch, batch, rank: position of the batch (epoch, global batch index within it, rank); `dinov2` keys.
        indices: dataset indices of the B samples, in batch order; the `official` key.
        num_views: G, global crops per sample.

    Returns:
        [G*B, h, w] bool tensor, view-major.
    """
    if cfg.variant == "official":
        masks = official_masks(cfg, grid, seed=seed, epoch=epoch, indices=indices, num_views=num_views)
    else:
        masks = dinov2_masks(
            cfg, grid, seed=seed, epoch=epoch, batch=batch, rank=rank, num_crops=num_views * len(indices)
        )
    return torch.from_numpy(masks)


def masked_token_indices(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the masked tokens of `masks` [G*B, h, w] and their per-image weights.

    Returns:
        mask_indices [M] int64 in `masks.flatten().nonzero()` order, and mask_weights [M] float32 where each
        token weighs 1 / (masked count of its image), so the weights of a masked image sum to 1.
    """
    flat = masks.flatten(1)
    mask_indices = flat.flatten().nonzero().flatten()
    per_image = (1.0 / flat.sum(1).clamp(min=1).to(torch.float32))[:, None].expand_as(flat)
    return mask_indices, per_image[flat].contiguous()
