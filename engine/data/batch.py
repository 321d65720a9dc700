"""The batch types every training data stream hands over, and the masking collate that makes a `Batch`.

Shapes: B images per rank, G global views, L local views, h x w patch grid of a global crop (h = Hg // patch),
M masked tokens of the batch. Crops are view-major: all B images of view 0, then view 1, ...
    global_crops [G*B, 3, Hg, Wg] float32     local_crops [L*B, 3, Hl, Wl] float32
    masks [G*B, h, w] bool   mask_indices [M] int64   labels, indices [B] int64
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ibot_engine.config import MaskConfig
from ibot_engine.data.masking import generate_masks, masked_token_indices
from ibot_engine.data.normalise import normalise

# Domain tag of a sample's augmentation seed (masking.py and sources.py have their own): keys with equal numbers in
# different roles, e.g. (seed, epoch) of a permutation and of a sample's views, still give unrelated streams.
_TAG_AUGMENT = 0x4147  # "AG"


@dataclass
class Batch:
    """One rank's training batch; tensors are on the CPU until `.to(device)`."""

    global_crops: Tensor  # [G*B, 3, Hg, Wg] float32, view-major
    local_crops: Tensor  # [L*B, 3, Hl, Wl] float32, view-major; [0, 3, Hl, Wl] when L == 0
    masks: Tensor  # [G*B, h, w] bool, same order as global_crops
    mask_indices: Tensor  # [M] int64, masks.flatten().nonzero() order
    labels: Tensor  # [B] int64, -1 where unknown
    indices: Tensor  # [B] int64 dataset indices of the images actually loaded
    num_skipped: int = 0  # unreadable files replaced by the next readable one in this batch

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        return dataclasses.replace(
            self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "num_skipped"}
        )

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Every tensor on `device`; asynchronous from pinned memory when `non_blocking`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copy; the DataLoader's pin-memory thread calls this."""
        return self._map(Tensor.pin_memory)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset sample `index` in `epoch`: a 64-bit hash of (seed, epoch, index)."""
    return int(np.random.SeedSequence([_TAG_AUGMENT, seed, epoch, index]).generate_state(1, np.uint64)[0])


class SampleKey(NamedTuple):
    """What a worker is asked to produce: sample `index` of global batch `batch` of `epoch`."""

    epoch: int
    batch: int
    index: int


class Sample(NamedTuple):
    """One image's views and bookkeeping, as a worker hands it to the collate."""

    views: Any  # G global then L local crops [3, H, W] uint8 (CPU augmenter), or what the GPU augmenter finishes
    label: int
    index: int  # the index actually loaded (differs from the key's after skipping unreadable files)
    num_skipped: int
    key: SampleKey


def _stack(views: list[Tensor]) -> Tensor:
    """[N, 3, H, W] float32 of N views: uint8 ones normalised, float ones (already normalised) as they are."""
    if views[0].dtype != torch.uint8:
        return torch.stack(views)
    # uint8 views are [3, H, W] views of HWC arrays (cpu_aug.py): stacking them as HWC is a plain copy, and the
    # cast to float32 then writes CHW in one pass (stacking CHW first, a strided gather, costs ~20% more).
    return normalise(torch.stack([v.permute(1, 2, 0) for v in views]).permute(0, 3, 1, 2))


class MultiCropCollate:
    """Stacks samples view-major and draws the global-crop masks of the batch (CPU, in the worker).

    uint8 views (cpu_aug.py) become ImageNet-normalised float32 here, the whole batch in one pass; float views
    are taken as already normalised.
    """

    def __init__(
        self, mask_cfg: MaskConfig, *, num_global: int, local_size: int, grid: tuple[int, int], seed: int, rank: int
    ) -> None:
        self.mask_cfg = mask_cfg
        self.num_global = num_global
        self.local_size = local_size
        self.grid = grid
        self.seed = seed
        self.rank = rank

    def masks(self, samples: list[Sample]) -> tuple[Tensor, Tensor]:
        """The global crops' masks [G*B, h, w] of the batch and their flat indices [M]; seeded by the samples' keys."""
        key = samples[0].key
        masks = generate_masks(
            self.mask_cfg,
            self.grid,
            seed=self.seed,
            epoch=key.epoch,
            batch=key.batch,
            rank=self.rank,
            indices=[s.key.index for s in samples],
            num_views=self.num_global,
        )
        mask_indices, _ = masked_token_indices(masks)  # the loss weighs masked tokens itself (objective.py)
        return masks, mask_indices

    def __call__(self, samples: list[Sample]) -> Batch:
        num_views = len(samples[0].views)
        # One stack straight into view-major order: stacking per view and concatenating copies twice, and
        # these are the largest host buffers of the run (~150 MB at B = 64, 2 x 224 + 10 x 96).
        global_crops = _stack([s.views[v] for v in range(self.num_global) for s in samples])
        if num_views > self.num_global:
            local_crops = _stack([s.views[v] for v in range(self.num_global, num_views) for s in samples])
        else:
            local_crops = global_crops.new_empty((0, 3, self.local_size, self.local_size))
        masks, mask_indices = self.masks(samples)
        return Batch(
            global_crops=global_crops,
            local_crops=local_crops,
            masks=masks,
            mask_indices=mask_indices,
            labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
            indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
            num_skipped=sum(s.num_skipped for s in samples),
        )
