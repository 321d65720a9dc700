"""`build_data_stream`: the training stream the config names, a `BatchStream` (contract.py) of an image folder or
built-in data (`data.path`) or of WebDataset shards (`data.shards`), with the augmenter `data.augment` names."""

from __future__ import annotations

import torch

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.contract import BatchStream, StreamPlace
from ibot_engine.data.loader import DataStream, build_dataset
from ibot_engine.data.shards.stream import build_shard_stream


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

    Raises:
        ValueError: the dataset is missing, empty or smaller than one global batch.
    """
    place = StreamPlace(batch_size, patch_size, seed, rank, world_size, device)
    if data_cfg.shards.strip():  # WebDataset shards (engine/data/shards/) instead of data.path
        return build_shard_stream(data_cfg, mask_cfg, place)
    return DataStream(build_dataset(data_cfg), data_cfg, mask_cfg, place)
