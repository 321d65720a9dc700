"""The sources of the training stream, and what every source shares.

A stream (stream.py) is a **source** (which samples, in which order, read where) plus an **augmenter**
(augment.py: how a sample becomes its views, in the workers and then on the device). This module holds
* `StreamPlace` and `StreamBase`, what both sources share: the rank's place, the augmenter, the position, and the
  loop that hands batches over, finishing each on the device while the caller trains on the previous one when the
  augmenter works there;
* the source of an image folder or built-in data, `DataStream`: epoch sampler -> dataset -> the augmenter's views
  and masking collate -> `Batch` (batch.py), forever, resumable. The source of WebDataset shards is
  `shards.source.ShardStream`.

Order and seeding of `DataStream`, all pure functions of the run seed so that a resumed run is bit-identical on CPU:
* Epoch e uses a permutation of the dataset seeded by (seed, e). Global batch b of the epoch is
  perm[b*GB : (b+1)*GB] with GB = B * world_size; rank r takes the contiguous slice [r*B : (r+1)*B]. The tail
  that does not fill a global batch is dropped, so every rank has the same B (collectives and the loss's batch
  statistics need equal batches) and the same global batch is made of the same samples whatever the world size.
* The views of a sample come from a generator seeded by (seed, e, sample index) (views.py), and official
  masks by (seed, e, sample index, view) (masking.py), so neither depends on workers, ranks or batch position.
  DINOv2 masks are drawn per (seed, e, global batch index, rank).
* Workers are told which (epoch, batch, index) to produce through the sampler, so they hold no epoch state and
  one DataLoader iterator can run across epochs (no worker restart, no empty prefetch queue at epoch ends).

Shapes: as in batch.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.augment import Augmenter, build_augmenter
from ibot_engine.data.batch import Batch, Sample, SampleKey, sample_seed
from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.masking import seeded_rng
from ibot_engine.data.synthetic import builtin_dataset
from ibot_engine.preempt import stop_signal_safe_workers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPlace:
    """Where a stream's batches go: B images per rank, the patch grid, the run seed, this rank, its device."""

    batch_size: int
    patch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # default: CUDA when available


class StreamBase:
    """What both sources share. Subclasses set `steps_per_epoch` / `num_samples` and implement `_next_raw` (the
    next collated batch from the workers, with a token `_advance` needs) and `_advance` (move the position past
    a batch handed over).

    The augmenter is the one `data.augment` names, or `augmenter` when given (e.g. a benchmark's other transforms);
    its collate draws the masks, so it must be made for this place's patch grid, seed and rank.
    """

    steps_per_epoch: int
    num_samples: int

    def __init__(self, data_cfg: DataConfig, mask_cfg: MaskConfig, place: StreamPlace,
                 augmenter: Augmenter | None = None) -> None:
        if place.seed < 0:
            raise ValueError(f"train.seed must be >= 0 for the data stream, got {place.seed}")
        assert 0 <= place.rank < place.world_size
        self.batch_size = place.batch_size
        self.seed = place.seed
        self.rank = place.rank
        self.world_size = place.world_size
        self.num_workers = data_cfg.num_workers
        self.device = place.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pin_memory = self.device.type == "cuda"
        if augmenter is None:
            grid = (data_cfg.global_size // place.patch_size, data_cfg.global_size // place.patch_size)
            augmenter = build_augmenter(data_cfg, mask_cfg, grid=grid, seed=place.seed, rank=place.rank,
                                        device=self.device)
        self.augmenter: Augmenter = augmenter
        self.epoch = 0
        self.batch = 0
        self._batches: Iterator[Any] | None = None

    def _next_raw(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _advance(self, batch: Batch, token: Any) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        if not self.augmenter.on_device:
            while True:
                batch, token = self._next_raw()
                self._advance(batch, token)
                yield batch
        # Device augmenter: batch k+1's decode and crops are queued (on a side stream on CUDA) before batch k is
        # handed over, so they run while the caller's step k runs. The side stream does not wait for the main one:
        # it reads only pinned host memory, and the tensors it makes are recorded on the main stream at hand-over,
        # so the allocator reuses their memory only after the step that reads them. The position moves only when
        # a batch is handed over, so the batch prepared ahead is not counted as consumed.
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending: tuple[Batch, Any, Any] | None = None
        while True:
            raw, token = self._next_raw()
            if side is not None:
                with torch.cuda.stream(side):
                    batch = self.augmenter.finish(raw)
                    event = torch.cuda.Event()
                    event.record(side)
            else:
                batch, event = self.augmenter.finish(raw), None
            if pending is not None:
                yield self._hand_over(*pending)
            pending = (batch, event, token)

    def _hand_over(self, batch: Batch, event: Any, token: Any) -> Batch:
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)  # device-side wait, no host sync
            batch._map(lambda t: t.record_stream(current) or t)
        self._advance(batch, token)
        return batch

    def close(self) -> None:
        """Stop the dataloader workers now (they also stop when the stream is garbage-collected)."""
        batches, self._batches = self._batches, None
        # The DataLoader's multiprocessing iterator has no public way to stop its workers: it does so in `__del__`,
        # which runs only once every reference (a generator frame, a traceback) is gone. A stream that starts the
        # next epoch's workers right after this needs the old ones gone now, not at some later collection.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


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
    (a `BatchStream`, stream.py).

    Attributes:
        dataset: the image source (with `.classes` when labelled).
        num_samples: len(dataset).
        steps_per_epoch: global batches per epoch (num_samples // (batch_size * world_size)).
        epoch, batch: position of the next batch to be yielded (what `state_dict()` returns).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, data_cfg: DataConfig, mask_cfg: MaskConfig,
                 place: StreamPlace, augmenter: Augmenter | None = None) -> None:
        super().__init__(data_cfg, mask_cfg, place, augmenter)
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
