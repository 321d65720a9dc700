"""The official iBOT multi-crop augmentation, composed as bytedance/ibot composes it: the benchmark's peer and the
tests' reference for `data.augment=cpu` (engine/data/cpu_aug.py). Not used by the engine.

`main_ibot.py: DataAugmentationiBOT` with torchvision.transforms (v1) on PIL images: RandomResizedCrop (bicubic),
then RandomHorizontalFlip(0.5), RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), RandomGrayscale(0.2), then
`utils.GaussianBlur` (PIL's ImageFilter.GaussianBlur, radius ~ U(0.1, 2)) with p = 1.0 (global view 1), 0.1
(global view 2) and 0.5 (locals), `utils.Solarization` (PIL's ImageOps.solarize, threshold 128) p=0.2 on global
view 2, then ToTensor and Normalize (ImageNet). Images are decoded with PIL (`default_loader`: open, convert to
RGB). The official code draws the crop and colour parameters from torch's global generator and the blur and
solarize decisions from Python's `random`; here both are reseeded from the sample's seed before each image, so a
run is repeatable (the laws are unchanged).
"""

from __future__ import annotations

import io
import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
from torchvision import transforms

from ibot_engine.config import DataConfig
from ibot_engine.data.augment import CpuAugmenter
from ibot_engine.data.batch import MultiCropCollate
from ibot_engine.data.normalise import IMAGENET_MEAN, IMAGENET_STD


class GaussianBlur:
    """`utils.GaussianBlur` of the official code: PIL blur with probability p, radius ~ U(0.1, 2)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """`utils.Solarization` of the official code: PIL solarize (threshold 128) with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class OfficialMultiCrop:
    """`DataAugmentationiBOT(global_scale, local_scale, num_global, num_local)` of the official code; `__call__(image,
    seed)` returns the G + L normalised float32 views [3, S, S] of a PIL image."""

    def __init__(self, cfg: DataConfig) -> None:
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.num_global = cfg.num_global
        self.num_local = cfg.num_local
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(1.0), normalize,
        ])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize,
        ])
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, interpolation=bicubic),
            flip_and_color_jitter, GaussianBlur(p=0.5), normalize,
        ])

    def __call__(self, image: Image.Image, seed: int) -> list[Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            crops = [(self.global_transfo1 if g % 2 == 0 else self.global_transfo2)(image)
                     for g in range(self.num_global)]
            crops += [self.local_transfo(image) for _ in range(self.num_local)]
        return crops


class OfficialAugmenter(CpuAugmenter):
    """A `CpuAugmenter` whose workers run the official transforms (the benchmark swaps it into a stream)."""

    def __init__(self, data_cfg: DataConfig, collate: MultiCropCollate) -> None:
        super().__init__(data_cfg, collate)
        self.transform = OfficialMultiCrop(data_cfg)

    def from_image(self, image: Image.Image, seed: int) -> list[Tensor]:
        return self.transform(image.convert("RGB") if image.mode != "RGB" else image, seed)

    def from_bytes(self, data: bytes, seed: int) -> list[Tensor]:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
        return self.transform(image, seed)
