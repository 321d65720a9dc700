"""Augmenters: how a source's images become the multi-crop views of a `Batch`. `build_augmenter` is the one place
that reads `data.augment`.

An augmenter works in two processes:
* in the dataloader workers, `from_image` / `from_bytes` turn one decoded image / one file's bytes into the
  sample's views (seeded by the sample's own seed, so views do not depend on workers or ranks), and `collate`
  stacks a batch of `Sample`s and draws its masks;
* in the training process, `finish` completes a collated batch on the training device.

`CpuAugmenter` (`data.augment=cpu`): the whole recipe on uint8 arrays in the workers (cpu_aug.py: decode once,
OpenCV and torch kernels), normalised to float32 by the collate; `finish` only returns the `Batch`.
`GpuAugmenter` (`data.augment=gpu`): the workers keep each image as uint8 (or, from shards, as JPEG bytes to be
decoded on the device) and draw every view's random parameters; `collate` gives a `RawBatch`, and `finish` decodes
it and makes all crops at once with batched tensor ops (gpu_aug.py), on whatever device the stream trains on (CPU
tensors too). Both serve every source: image folders, built-in data and shards.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.batch import Batch, MultiCropCollate, Sample
from ibot_engine.data.cpu_aug import MultiCropTransform, decode_jpeg, rgb_array
from ibot_engine.data.gpu_aug import GpuMultiCrop, decode_batch
from ibot_engine.data.views import draw_view_params

logger = logging.getLogger(__name__)


class PendingViews(NamedTuple):
    """A sample on the GPU augmenter's path, as a worker leaves it: the image and its views' parameters."""

    image: Tensor  # [3, H, W] uint8 decoded, or 1-D uint8 JPEG bytes still to decode on the device
    params: Tensor  # [V, NUM_PARAMS] float32 (views.py)


@dataclass
class RawBatch:
    """A collated batch on the GPU augmenter's path: images still to be decoded / cropped, view parameters, masks."""

    images: list[Tensor]  # B 1-D uint8 encoded JPEGs, or [3, H, W] uint8 when decoded
    params: Tensor  # [V, B, NUM_PARAMS] float32, view-major
    masks: Tensor
    mask_indices: Tensor
    labels: Tensor
    indices: Tensor
    num_skipped: int = 0

    def pin_memory(self) -> RawBatch:
        pin = Tensor.pin_memory
        return RawBatch([pin(t) for t in self.images], pin(self.params), pin(self.masks), pin(self.mask_indices),
                        pin(self.labels), pin(self.indices), self.num_skipped)


def _looks_complete_jpeg(data: bytes) -> bool:
    """Starts with SOI and has an EOI marker near the end (catches truncation before the GPU sees the bytes)."""
    return data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) >= 0


def _uint8_chw(image: Image.Image) -> Tensor:
    return pil_to_tensor(image.convert("RGB"))  # [3, H, W] uint8


class CpuAugmenter:
    """Multi-crop in the dataloader workers (uint8, cpu_aug.py); the training process gets `Batch`es."""

    on_device = False

    def __init__(self, data_cfg: DataConfig, collate: MultiCropCollate) -> None:
        self.transform = MultiCropTransform(data_cfg)
        self.collate_samples = collate

    def from_image(self, image: Image.Image, seed: int) -> list[Tensor]:
        return self.transform(image, seed=seed)

    def from_bytes(self, data: bytes, seed: int) -> list[Tensor]:
        """Decoded once, in full; raises on a corrupt or truncated image (the caller skips the sample).

        A complete JPEG is decoded by OpenCV (libjpeg-turbo, the same pixels as PIL's, in half the time); anything
        else (other formats, JPEGs without an end marker: OpenCV would fill a truncated one with grey) by PIL."""
        pixels = decode_jpeg(data) if _looks_complete_jpeg(data) else None
        if pixels is None:
            with Image.open(io.BytesIO(data)) as opened:
                pixels = rgb_array(opened)
        return self.transform(pixels, seed=seed)

    def collate(self, samples: list[Sample], num_skipped: int = 0) -> Batch:
        batch = self.collate_samples(samples)
        batch.num_skipped += num_skipped
        return batch

    def finish(self, batch: Batch) -> Batch:
        return batch


class GpuAugmenter:
    """Multi-crop on the training device: workers draw the views' parameters, `finish` crops the whole batch."""

    on_device = True

    def __init__(self, data_cfg: DataConfig, collate: MultiCropCollate, device: torch.device) -> None:
        self.cfg = data_cfg
        self.collate_samples = collate
        self.device = device
        self.crop = GpuMultiCrop(data_cfg)

    # ---- in the workers

    def from_image(self, image: Image.Image, seed: int) -> PendingViews:
        pixels = _uint8_chw(image)
        return PendingViews(pixels, draw_view_params(pixels.shape[1], pixels.shape[2], self.cfg, seed))

    def from_bytes(self, data: bytes, seed: int) -> PendingViews:
        """Raises on a corrupt or truncated image (the caller skips the sample)."""
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.cfg.decode == "cpu":
            payload = decode_image(encoded, mode=ImageReadMode.RGB)
            height, width = payload.shape[1:]
        else:
            with Image.open(io.BytesIO(data)) as opened:  # header only: format and size
                fmt, (width, height) = opened.format, opened.size
                if fmt != "JPEG":  # the device decoder reads JPEG only: decode other formats here
                    payload = _uint8_chw(opened)
                elif not _looks_complete_jpeg(data):
                    raise OSError("truncated JPEG (no end-of-image marker)")
                else:
                    payload = encoded
        return PendingViews(payload, draw_view_params(height, width, self.cfg, seed))

    def collate(self, samples: list[Sample], num_skipped: int = 0) -> RawBatch:
        masks, mask_indices = self.collate_samples.masks(samples)
        return RawBatch(
            images=[s.views.image for s in samples],
            params=torch.stack([s.views.params for s in samples], dim=1),
            masks=masks, mask_indices=mask_indices,
            labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
            indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
            num_skipped=sum(s.num_skipped for s in samples) + num_skipped,
        )

    # ---- in the training process

    def finish(self, raw: RawBatch) -> Batch:
        """Decode (where the workers left bytes) and crop a `RawBatch` on the device."""
        device = self.device
        num_skipped = raw.num_skipped
        encoded = [im for im in raw.images if im.dim() == 1]
        decoded, failed = decode_batch(encoded, device) if encoded else ([], [])
        for i in failed:
            logger.warning("data: skipping an undecodable JPEG (sample %d of the batch); its slot reuses another "
                           "image of the batch", i)
        num_skipped += len(failed)
        if device.type == "cuda":
            # torchvision decodes on its own stream (and makes the current one wait for it); the images are then
            # read on the current stream, so their memory must not return to the decoder stream's pool before that.
            current = torch.cuda.current_stream(device)
            for image in decoded:
                image.record_stream(current)
        it = iter(decoded)
        images = [next(it) if im.dim() == 1 else im.to(device, non_blocking=True) for im in raw.images]
        global_crops, local_crops = self.crop(images, raw.params)
        return Batch(
            global_crops=global_crops, local_crops=local_crops,
            masks=raw.masks.to(device, non_blocking=True),
            mask_indices=raw.mask_indices.to(device, non_blocking=True),
            labels=raw.labels.to(device, non_blocking=True), indices=raw.indices.to(device, non_blocking=True),
            num_skipped=num_skipped,
        )


Augmenter = CpuAugmenter | GpuAugmenter


def build_augmenter(data_cfg: DataConfig, mask_cfg: MaskConfig, *, grid: tuple[int, int], seed: int, rank: int,
                    device: torch.device) -> Augmenter:
    """The augmenter `data.augment` names (the one place that reads it), with the batch's masking collate."""
    collate = MultiCropCollate(mask_cfg, num_global=data_cfg.num_global, local_size=data_cfg.local_size, grid=grid,
                               seed=seed, rank=rank)
    if data_cfg.augment == "gpu":
        return GpuAugmenter(data_cfg, collate, device)
    return CpuAugmenter(data_cfg, collate)
