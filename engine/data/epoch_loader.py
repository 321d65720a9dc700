"""A standard per-epoch `torch.utils.data.DataLoader` of iBOT batches, for loops other than ours.

Our own trainer reads an endless `DataStream` (sources.py). Other loops (a plain PyTorch `for epoch ...` loop, the
Lightning `Trainer`) expect a finite DataLoader whose sampler is told the epoch through `set_epoch`. This module gives
them one that yields *the same batches as `DataStream`*, batch for batch: the same sample order per epoch and rank,
the same views and the same masks (both are seeded by the sample and the epoch, not by the loader).

`EpochKeySampler` is a `DistributedSampler` (so Lightning leaves it alone under DDP instead of injecting its own)
that yields this rank's `SampleKey`s of one epoch in batch order; the DataLoader groups them `batch_size` at a time
(drop_last) and the masking collate (`MultiCropCollate`) turns each group into a `Batch`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import torch.utils.data
from torch.utils.data.distributed import DistributedSampler

from ibot_engine.config import Config
from ibot_engine.data.batch import MultiCropCollate, SampleKey
from ibot_engine.data.cpu_aug import MultiCropTransform
from ibot_engine.data.sources import EpochBatchSampler, MultiCropDataset, build_dataset


class EpochKeySampler(DistributedSampler):
    """This rank's sample keys of epoch `self.epoch` (set with `set_epoch`), in the order of `EpochBatchSampler`.

    Every `batch_size` consecutive keys are one per-rank batch of `DataStream`; the tail of the dataset that does not
    fill a global batch of `batch_size * world_size` is dropped, so every rank yields `len(self)` keys.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the dataset has {num_samples} images, fewer than one global batch of {batch_size * world_size} "
                f"(batch size {batch_size} x world size {world_size}); lower the batch size"
            )
        # The parent's bookkeeping (epoch, rank, num_replicas) without its dataset: we only need the sample count.
        super().__init__(range(num_samples), num_replicas=world_size, rank=rank, shuffle=False, seed=seed,
                         drop_last=True)
        self.batch_size = batch_size
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        self.num_samples = self.steps_per_epoch * batch_size  # keys per rank and epoch (DistributedSampler's name)
        self.total_size = self.num_samples * world_size
        self._dataset_size = num_samples

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        batches = EpochBatchSampler(
            self._dataset_size, self.batch_size, seed=self.seed, rank=self.rank, world_size=self.num_replicas,
            start_epoch=self.epoch,
        )
        for keys in itertools.islice(batches, self.steps_per_epoch):
            yield from keys

    def __len__(self) -> int:
        return self.num_samples


def build_train_loader(
    cfg: Config, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None
) -> torch.utils.data.DataLoader:
    """The iBOT training DataLoader of `cfg.data.path` for one rank and one epoch at a time.

    Call `loader.sampler.set_epoch(epoch)` before each epoch (Lightning does). Batches are
    `ibot_engine.data.batch.Batch` (move them with `batch.to(device)`); `len(loader)` is the number of steps per
    epoch. Seeded by `cfg.train.seed`; `cfg.train.batch_size` images per rank; masks from `cfg.mask`;
    `cfg.data.num_workers` worker processes.

    Raises:
        ValueError: the dataset is missing, empty or smaller than one global batch.
    """
    if cfg.train.seed < 0:
        raise ValueError(f"train.seed must be >= 0 for the data loader, got {cfg.train.seed}")
    dataset = build_dataset(cfg.data)
    seed, grid = cfg.train.seed, cfg.data.global_size // cfg.model.patch_size
    sampler = EpochKeySampler(len(dataset), cfg.train.batch_size, seed=seed, rank=rank,  # type: ignore[arg-type]
                              world_size=world_size)
    collate = MultiCropCollate(cfg.mask, num_global=cfg.data.num_global, local_size=cfg.data.local_size,
                               grid=(grid, grid), seed=seed, rank=rank)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.utils.data.DataLoader(
        MultiCropDataset(dataset, MultiCropTransform(cfg.data), seed),
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # not the global RNG: the model's stream stays untouched
    )
