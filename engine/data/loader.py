"""The training data stream of an image folder or a built-in dataset: epoch sampler -> dataset -> the augmenter's
views and masking collate (augment.py) -> `Batch` (batch.py), forever, resumable.

`DataStream` is the folder / built-in source of the `BatchStream` contract (contract.py); `build_data_stream`
(stream.py) builds it, or the WebDataset source for `data.shards`.

Order and seeding, all pure functions of the run seed so that a resumed run is bit-identical on CPU:
* Epoch e uses a permutation of the dataset seeded by (seed, e). Global batch b of the epoch is
  perm[b*GB : (b+1)*GB] with GB = B * world_size; rank r takes the contiguous slice [r*B : (r+1)*B]. The tail
  that does not fill a global batch is dropped, so every rank has the same B (collectives and the loss's batch
  statistics need equal batches) and the same global batch is made of the same samples whatever the world size.
* The views of a sample come from a generator seeded by (seed, e, sample index) (transforms.py), and official
  masks by (seed, e, sample index, view) (masking.py), so neither depends on workers, ranks or batch position.
  DINOv2 masks are drawn per (seed, e, global batch index, rank).
* Workers are told which (epoch, batch, index) to produce through the sampler, so they hold no epoch state and
  one DataLoader iterator can run across epochs (no worker restart, no empty prefetch queue at epoch ends).

Shapes: as in batch.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.batch import Batch, Sample, SampleKey, sample_seed
from ibot_engine.data.contract import StreamBase, StreamPlace
from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.masking import seeded_rng
from ibot_engine.data.synthetic import builtin_dataset
from ibot_engine.preempt import stop_signal_safe_workers

logger = logging.getLogger(__name__)

# Domain tag of the epoch permutation (batch.py and masking.py have their own): keys with equal numbers in different
# roles, e.g. (seed, epoch) of a permutation and of a sample's views, still give unrelated streams.
_TAG_PERMUTATION = 0x5045  # "PE"


class EpochBatchSampler:
    """Endless per-rank batches of `SampleKey`s from (start_epoch, start_batch) on; see the module docstring."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        start_epoch: int = 0,
        start_batch: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        assert self.steps_per_epoch > 0 and 0 <= start_batch < self.steps_per_epoch
        self.start_epoch = start_epoch
        self.start_batch = start_batch

    def global_batch(self, permutation: np.ndarray, batch: int) -> np.ndarray:
        """Dataset indices of global batch `batch` ([batch_size * world_size]), all ranks."""
        size = self.batch_size * self.world_size
        return permutation[batch * size : (batch + 1) * size]

    def permutation(self, epoch: int) -> np.ndarray:
        return seeded_rng(_TAG_PERMUTATION, self.seed, epoch).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, batch = self.start_epoch, self.start_batch
        while True:
            permutation = self.permutation(epoch)
            for b in range(batch, self.steps_per_epoch):
                mine = self.global_batch(permutation, b)[
                    self.rank * self.batch_size : (self.rank + 1) * self.batch_size
                ]
                yield [SampleKey(epoch, b, int(i)) for i in mine]
            epoch, batch = epoch + 1, 0


class MultiCropDataset(torch.utils.data.Dataset):
    """Maps a `SampleKey` to that image's views, `views(image, seed)` (runs in the dataloader workers)."""

    def __init__(self, dataset: torch.utils.data.Dataset, views: Callable[[Image.Image, int], Any], seed: int) -> None:
        self.dataset = dataset
        self.views = views
        self.seed = seed

    def __getitem__(self, key: SampleKey) -> Sample:  # type: ignore[override]
        if isinstance(self.dataset, ImageFolderDataset):
            image, label, num_skipped = self.dataset.load(key.index)
        else:
            image, label = self.dataset[key.index]
            num_skipped = 0
        views = self.views(image, sample_seed(self.seed, key.epoch, key.index))
        index = (key.index + num_skipped) % len(self.dataset)  # type: ignore[arg-type]
        return Sample(views, label, index, num_skipped, key)


def build_dataset(data_cfg: DataConfig) -> torch.utils.data.Dataset:
    """The image source named by `data.path`: the built-in demo shapes or an image folder."""
    if not data_cfg.path.strip():
        raise ValueError("data.path is empty: set data.path=/path/to/images (an image folder) or builtin:shapes")
    if data_cfg.path.startswith("builtin:"):
        return builtin_dataset(data_cfg.path, data_cfg.builtin_size, "train")
    return ImageFolderDataset(data_cfg.path)


class DataStream(StreamBase):
    """Endless iterable of `Batch` for one rank of an image folder or built-in data, resumable at batch granularity
    (a `BatchStream`, contract.py).

    Attributes:
        dataset: the image source (with `.classes` when labelled).
        num_samples: len(dataset).
        steps_per_epoch: global batches per epoch (num_samples // (batch_size * world_size)).
        epoch, batch: position of the next batch to be yielded (what `state_dict()` returns).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, data_cfg: DataConfig, mask_cfg: MaskConfig,
                 place: StreamPlace) -> None:
        super().__init__(data_cfg, mask_cfg, place)
        self.dataset = dataset
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        global_batch = place.batch_size * place.world_size
        if self.num_samples < global_batch:
            raise ValueError(
                f"data.path {data_cfg.path!r} has {self.num_samples} images, fewer than one global batch of "
                f"{global_batch} (train.batch_size {place.batch_size} x world size {place.world_size}); lower "
                "train.batch_size"
            )
        self.steps_per_epoch = self.num_samples // global_batch
        self.samples = MultiCropDataset(dataset, self.augmenter.from_image, place.seed)
        logger.info(
            "data: %d images from %s, %d steps per epoch of %d x %d images, %d workers, %s masks, augment on %s",
            self.num_samples, data_cfg.path, self.steps_per_epoch, place.batch_size, place.world_size,
            self.num_workers, mask_cfg.variant, "the device" if self.augmenter.on_device else "the CPU workers",
        )

    def _start(self) -> Iterator[Any]:
        sampler = EpochBatchSampler(
            self.num_samples,
            self.batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            start_epoch=self.epoch,
            start_batch=self.batch,
        )
        loader = torch.utils.data.DataLoader(
            self.samples,
            batch_sampler=sampler,
            collate_fn=self.augmenter.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Creating an iterator draws a base seed from this generator; the default (the global RNG)
            # would make the trainer's RNG stream depend on when the stream was (re)started.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=stop_signal_safe_workers(),  # a SLURM signal to every process must not kill the workers
        )
        return iter(loader)

    def _next_raw(self) -> tuple[Any, None]:
        if self._batches is None:
            self._batches = self._start()
        return next(self._batches), None

    def _advance(self, batch: Batch, token: None) -> None:
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch to be yielded (prefetched batches do not count)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`: the next batch is the one an uninterrupted run would yield there."""
        if not 0 <= state["batch"] < self.steps_per_epoch:
            raise ValueError(
                f"data state batch {state['batch']} is outside the {self.steps_per_epoch} batches per epoch of "
                "this dataset and batch size"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.close()  # the old iterator (and its workers and prefetched batches) is dropped
