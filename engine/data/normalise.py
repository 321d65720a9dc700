"""The ImageNet input normalisation every model input goes through: the collate of the CPU augmenter's uint8
views (batch.py, `normalise`), the GPU augmenter (gpu_aug.py) and the evaluation transforms (engine/eval) read the
statistics here, so that neither augmenter imports the other."""

from __future__ import annotations

import torch
import torch.utils.data
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(views: Tensor) -> Tensor:
    """uint8 views [N, 3, H, W] (any strides) -> float32 (x / 255 - mean) / std, ImageNet statistics, contiguous.

    In a dataloader worker the result is made in shared memory, where the batch travels to the training process:
    otherwise the queue copies it there once more (~2.3 MB per image at 2 x 224 + 10 x 96), as torch's
    `default_collate` also avoids."""
    out = torch.empty(0)
    if torch.utils.data.get_worker_info() is not None:
        out = out.set_(out.untyped_storage()._new_shared(views.numel() * out.element_size()))
    out = out.resize_(views.shape).copy_(views)
    scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    return out.mul_(scale).add_(shift)
