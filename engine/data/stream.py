"""The training stream: the contract every stream keeps (`BatchStream`, what the trainer reads) and
`build_data_stream`, the stream the config names.

A stream is a source (sources.py: an image folder or built-in data, `data.path`; shards/: WebDataset shards,
`data.shards`) plus an augmenter (augment.py: the one `data.augment` names, or one the caller passes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.augment import Augmenter
from ibot_engine.data.batch import Batch
from ibot_engine.data.shards.source import build_shard_stream
from ibot_engine.data.sources import DataStream, StreamPlace, build_dataset


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


def build_data_stream(
    data_cfg: DataConfig,
    mask_cfg: MaskConfig,
    *,
    batch_size: int,
    patch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    augmenter: Augmenter | None = None,
) -> BatchStream:
    """The training stream for one rank: a `DataStream` of `data.path`, or a `ShardStream` of `data.shards`.

    Args:
        data_cfg: dataset, crop sizes and counts, augmenter, workers.
        mask_cfg: masking variant and its parameters.
        batch_size: B, images per rank.
        patch_size: ViT patch size; the mask grid is global_size // patch_size squared.
        seed: run seed (train.seed); fixes the order, the views and the masks.
        rank, world_size: this process's slice of each global batch.
        device: where batches will go; pinned host memory when it is CUDA, and where the GPU augmenter works
            (default: CUDA if available).
        augmenter: how samples become views (augment.py); None: the one `data.augment` names. One passed here
            draws the masks with its own collate, which must be made for this patch grid, seed and rank.

    Raises:
        ValueError: the dataset is missing, empty or smaller than one global batch.
    """
    place = StreamPlace(batch_size, patch_size, seed, rank, world_size, device)
    if data_cfg.shards.strip():  # WebDataset shards (engine/data/shards/) instead of data.path
        return build_shard_stream(data_cfg, mask_cfg, place, augmenter)
    return DataStream(build_dataset(data_cfg), data_cfg, mask_cfg, place, augmenter)
