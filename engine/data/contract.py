"""The contract every training data stream keeps (`BatchStream`), and the base its two sources share.

A stream is a **source** (which samples, in which order, read where: `loader.DataStream` for image folders and
built-in data through the epoch sampler, `shards.stream.ShardStream` for WebDataset shards through the resolver and
the worker reader) plus an **augmenter** (augment.py: how a sample becomes its views, in the workers and then on
the device). `StreamBase` holds what both sources have in common: the rank's place (`StreamPlace`), the
augmenter, the position, and the loop that hands batches over, finishing each on the device while the caller
trains on the previous one when the augmenter works there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.augment import Augmenter, build_augmenter
from ibot_engine.data.batch import Batch

logger = logging.getLogger(__name__)


@runtime_checkable
class BatchStream(Protocol):
    """An endless, resumable iterable of one rank's `Batch`es.

    `state_dict()` is the position of the next batch to be yielded; `load_state_dict` continues there so that a
    resumed run gets exactly the batches of an uninterrupted one. `close()` stops the stream's worker processes.
    """

    steps_per_epoch: int
    num_samples: int

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


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
    a batch handed over)."""

    steps_per_epoch: int
    num_samples: int

    def __init__(self, data_cfg: DataConfig, mask_cfg: MaskConfig, place: StreamPlace) -> None:
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
        grid = (data_cfg.global_size // place.patch_size, data_cfg.global_size // place.patch_size)
        self.augmenter: Augmenter = build_augmenter(data_cfg, mask_cfg, grid=grid, seed=place.seed,
                                                    rank=place.rank, device=self.device)
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
