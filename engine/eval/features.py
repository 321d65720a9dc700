"""Frozen backbone features of a labelled dataset, the one extractor k-NN and the linear probe share.

Features are the backbone's cls token (or cls token and mean patch token), fp32 on the CPU, in dataset order. Under
torchrun every rank extracts the features of a strided share of the images (rank r: images r, r + W, ...); the
shares are all-gathered back into dataset order, so the result equals a one-process run.

Shapes: B images of a batch, T = 1 + N tokens, D feature dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor, nn
from torchvision.transforms import v2

from ibot_engine.config import Config
from ibot_engine.data.normalise import IMAGENET_MEAN, IMAGENET_STD
from ibot_engine.distributed import get_rank, get_world_size
from ibot_engine.model.ibot import IBOT
from ibot_engine.preempt import stop_signal_safe_workers

FEATURES = ("cls", "cls+patch")


def eval_transform(image_size: int) -> v2.Compose:
    """PIL image -> normalised float tensor [3, image_size, image_size] (resize only, no crop)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _Transformed(torch.utils.data.Dataset):
    """Applies `transform` to the image of each `(image, label)` pair of `dataset`."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: v2.Compose) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    data: torch.utils.data.Dataset | Iterable[tuple[Tensor, Tensor]],
    *,
    image_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    features: str = "cls",
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cls-token features of every image, L2-normalised.

    Args:
        backbone: `forward(images [B, 3, H, W]) -> tokens [B, 1 + N, D]` (final norm applied); token 0 is cls.
        data: a dataset of `(PIL image, label)` pairs, which gets the evaluation transform (resize to
            `image_size`, ImageNet normalisation), or an iterable of ready `(images [B, 3, H, W], labels [B])`
            batches, used as is.
        image_size: side the images are resized to (datasets only).
        batch_size: images per forward pass (datasets only).
        device: where the backbone runs.
        num_workers: DataLoader workers for datasets.
        autocast_dtype: e.g. torch.bfloat16 to run the forward under autocast on GPU; features are fp32 anyway.
        features: `cls` (the cls token, [N, D]) or `cls+patch` (cls token and mean patch token concatenated,
            [N, 2D]).
        normalize: L2-normalise each feature row (k-NN); the linear probe standardises raw features instead.

    Returns:
        `(features [N, D or 2D] fp32 on the CPU, unit L2 norm if normalize, labels [N] int64 on the CPU)`, in
        data order.
    """
    if features not in FEATURES:
        raise ValueError(f"features={features!r}: use one of {list(FEATURES)}")
    if isinstance(data, torch.utils.data.Dataset):
        data = torch.utils.data.DataLoader(
            _Transformed(data, eval_transform(image_size)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            worker_init_fn=stop_signal_safe_workers(),  # k-NN during training: a stop signal is the trainer's
        )
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    out, labels = [], []
    try:
        for images, batch_labels in data:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                tokens_BTD = backbone(images.to(device, non_blocking=True))
            feats_BD = tokens_BTD[:, 0].float()
            if features == "cls+patch":
                feats_BD = torch.cat([feats_BD, tokens_BTD[:, 1:].float().mean(1)], dim=-1)
            out.append((F.normalize(feats_BD, dim=-1) if normalize else feats_BD).cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out), torch.cat(labels)


def teacher_backbone(cfg: Config, state: dict[str, Any] | None, device: torch.device,
                     which: str = "teacher") -> torch.nn.Module:
    """The teacher (or student) backbone of a checkpoint's model state, or of a fresh model (seeded by
    train.seed)."""
    torch.manual_seed(cfg.train.seed)
    model = IBOT(cfg.model, cfg.loss)
    if state is not None:
        model.load_state_dict(state)
    return getattr(model, which).backbone.to(device).eval()


def gather_in_order(local: Tensor, total: int, device: torch.device) -> Tensor:
    """Rows of rank r are items r, r + W, r + 2W, ... of `total`; returns all `total` rows in item order."""
    world = get_world_size()
    if world == 1:
        return local
    per_rank = math.ceil(total / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    padded = padded.to(device)  # NCCL gathers device tensors; gloo CPU ones
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    # stack -> [per_rank, W, ...]: row j of rank r is item j * W + r; the padding lands past `total`.
    return torch.stack(shards, dim=1).flatten(0, 1)[:total].cpu()


def dataset_features(backbone: torch.nn.Module, dataset: torch.utils.data.Dataset, *, image_size: int,
                     batch_size: int, device: torch.device, amp: torch.dtype | None, features: str = "cls",
                     normalize: bool = True, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """`extract_features` of the whole dataset, split over the ranks of the process group (if any)."""
    rank, world = get_rank(), get_world_size()
    total = len(dataset)  # type: ignore[arg-type]
    if total < world:
        raise ValueError(f"{total} images cannot be split over {world} ranks")
    # Every rank embeds the same number of images (the last one repeated where the split is uneven, then dropped),
    # so every rank runs the same forwards: an FSDP-sharded teacher gathers its parameters in each of them.
    per_rank, own = math.ceil(total / world), len(range(rank, total, world))
    shard = dataset if world == 1 else torch.utils.data.Subset(
        dataset, [min(i, total - 1) for i in range(rank, per_rank * world, world)])
    feats, labels = extract_features(backbone, shard, image_size=image_size, batch_size=batch_size, device=device,
                                     autocast_dtype=amp, features=features, normalize=normalize,
                                     num_workers=num_workers)
    feats, labels = feats[:own], labels[:own]
    return gather_in_order(feats, total, device), gather_in_order(labels, total, device)


def split_features(backbone: nn.Module, datasets: dict[str, torch.utils.data.Dataset], **kwargs: Any
                   ) -> dict[str, tuple[Tensor, Tensor]]:
    """`dataset_features` (same keyword arguments) of each named dataset, e.g. the train and val splits."""
    return {name: dataset_features(backbone, dataset, **kwargs) for name, dataset in datasets.items()}
