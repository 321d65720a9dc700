"""The iBOT multi-crop augmentation on the CPU (`data.augment=cpu`): uint8 arrays, OpenCV and torch kernels.

Per image: G global crops (`data.global_size`, scale `data.global_scale`) and L local crops (`data.local_size`,
`data.local_scale`), each with the official recipe of bytedance/ibot `main_ibot.py: DataAugmentationiBOT`: random
resized crop (bicubic), flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 in a random order, grayscale p=0.2,
Gaussian blur p=1.0 (global view 1) / 0.1 (global view 2) / 0.5 (locals), solarize p=0.2 (global view 2); with
G > 2 the two global pipelines alternate. The parameters of every view come from `views.view_param_rows`: the
GPU augmenter's law, and the official code's (torchvision's crop sampler, the same factors and probabilities).

Why not PIL + torchvision.transforms as the official code: that ran at ~30 img/s per core (2 x 224 + 10 x 96).
Where its time went (one core, 500 x 375 JPEG): the antialiased bicubic resize of each crop (1.7 ms at 224 px,
0.75 ms at 96 px), the hue shift (2.3 ms at 224 px: PIL's HSV round trip plus numpy copies), the blur, and the
float conversion of every view. Here the image is decoded once, in full, to a uint8 array (shard JPEGs by OpenCV:
PIL's pixels in half its time; folder images arrive decoded by PIL); each crop is a view of it, resized
by torch's uint8 antialiased bicubic kernel (PIL's filter, AVX2; 0.66 / 0.14 ms); the colour ops are OpenCV SIMD
kernels on uint8 (brightness, contrast and solarize are 256-entry lookup tables, saturation a weighted sum with the
grey image, hue a lookup on the H plane of OpenCV's 8-bit full-range HSV, grayscale `cvtColor`), the blur is a
separable Gaussian (`cv2.sepFilter2D`, kernel to 3 sigma, edge pixels replicated as PIL does); views stay uint8
until the collate, which converts the whole batch to normalised float32 at once (`normalise.normalise`). 3.3-3.9x the
official throughput per core, ~120 img/s per core on a 2-core VM
(benchmarks/results/data_cpu_fastaug_cpu2core_202612.md). What remains, per image on one core: the crop resizes
~2.5 ms, decode 0.9 (shards) / 1.8 (folders, PIL), colour jitter ~2, the float conversion of the views ~1.4, the
blur ~0.5.

Differences from the official pixels (tests/data/test_cpu_aug.py states the bounds): the resize is within 2 levels
of PIL's (0.01 on average); saturation and grayscale within 1 (OpenCV's fixed-point luma); the hue is quantised to
1/256 of a turn on OpenCV's 256-level hue circle where PIL uses 255 levels (both lose up to ~15 levels on dark
saturated pixels in their 8-bit HSV round trips); the blur is a true Gaussian where PIL stacks three box blurs
(within 1 level on average); flip, brightness, contrast and solarize are exact.

Randomness: all draws are made by `views.view_param_rows` from a `torch.Generator` seeded with the per-sample
`seed`, so a sample's views depend only on (image, seed), not on workers or ranks, and no global RNG is read or
changed.

Shapes: a call returns G + L uint8 tensors [3, S, S] (S = global_size, then local_size), views of HWC arrays (not
contiguous); `normalise.normalise` turns a stack of them into ImageNet-normalised float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ibot_engine.config import DataConfig
from ibot_engine.data.views import (
    P_BLUR,
    P_BOX,
    P_BRIGHTNESS,
    P_CONTRAST,
    P_FLIP,
    P_GRAY,
    P_HUE,
    P_JITTER,
    P_ORDER,
    P_SATURATION,
    P_SIGMA,
    P_SOLARIZE,
    view_param_rows,
)

try:
    import cv2
except ImportError:  # a dependency (pyproject), but an image without it must still import the engine and run
    cv2 = None  # data.augment=gpu (the GPU device's image has no OpenCV); MultiCropTransform then says what to do

SOLARIZE_THRESHOLD = 128

_LEVELS = np.arange(256, dtype=np.float32)
_SOLARIZE_LUT = np.where(_LEVELS < SOLARIZE_THRESHOLD, _LEVELS, 255 - _LEVELS).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Per-view ops on uint8 HWC RGB arrays (contiguous); each returns a new array.


def resized_crop(image: Tensor, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop `box` = (left, top, right, bottom) of `image` [H, W, 3] uint8 and resize it to size x size.

    Bicubic with PIL's antialiasing when downscaling (torch's uint8 kernel: within 1 level of PIL's resize)."""
    left, top, right, bottom = box
    # A channels-last copy of the crop: torch's vectorised uint8 kernel then writes channels-last (HWC) output,
    # 2.5x faster than resizing the strided view and copying the result to HWC.
    crop = image[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def flip(image: np.ndarray) -> np.ndarray:
    return cv2.flip(image, 1)


def _blend_lut(factor: float, base: float) -> np.ndarray:
    """Lookup table of PIL's blend `base + factor * (x - base)`, truncated and clipped to uint8 as PIL does."""
    blended = np.float32(base) + np.float32(factor) * (_LEVELS - np.float32(base))
    return np.clip(np.trunc(blended), 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(image, _blend_lut(factor, 0.0))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level (rounded to an integer, as PIL's ImageEnhance.Contrast)."""
    mean = int(cv2.mean(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))[0] + 0.5)
    return cv2.LUT(image, _blend_lut(factor, mean))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image (ITU-R 601-2 luma). OpenCV rounds to nearest where PIL truncates: the offset
    -0.499 makes it truncate too (but for sums within 0.001 below an integer), so the mean level is PIL's."""
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, grey, 1.0 - factor, -0.499)


def adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """Rotate the hue by `factor` turns (|factor| <= 0.5) on OpenCV's 256-level hue circle."""
    shift = round(factor * 256) % 256
    if shift == 0:
        return image
    lut = np.empty((1, 256, 3), dtype=np.uint8)
    lut[0, :, 0] = (np.arange(256) + shift) % 256
    lut[0, :, 1] = lut[0, :, 2] = np.arange(256)
    hsv = cv2.LUT(cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL), lut)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def grayscale(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation `sigma`: a separable kernel to +-3 sigma (as cv2.GaussianBlur sizes it
    for uint8; no truncation worth seeing), edge pixels replicated as PIL's GaussianBlur does. `sepFilter2D` with a
    float kernel rather than `GaussianBlur`, whose bit-exact fixed-point path is 2-4x slower at these sizes."""
    kernel = cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F)
    return cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)


def solarize(image: np.ndarray) -> np.ndarray:
    """Levels >= 128 inverted (PIL ImageOps.solarize(threshold=128))."""
    return cv2.LUT(image, _SOLARIZE_LUT)


_JITTER_OPS = (
    (P_BRIGHTNESS, adjust_brightness),
    (P_CONTRAST, adjust_contrast),
    (P_SATURATION, adjust_saturation),
    (P_HUE, adjust_hue),
)


def augment_view(image: Tensor, params: list[float], size: int) -> np.ndarray:
    """One view of `image` [H, W, 3] uint8 from its parameter row (views.py): crop, flip, jitter, grey, blur,
    solarize, in the official order."""
    left, top, right, bottom = (int(v) for v in params[P_BOX])
    view = resized_crop(image, (left, top, right, bottom), size)
    if params[P_FLIP] > 0.5:
        view = flip(view)
    if params[P_JITTER] > 0.5:
        for op_id in params[P_ORDER]:
            column, op = _JITTER_OPS[int(op_id)]
            view = op(view, params[column])
    if params[P_GRAY] > 0.5:
        view = grayscale(view)
    if params[P_BLUR] > 0.5:
        view = gaussian_blur(view, params[P_SIGMA])
    if params[P_SOLARIZE] > 0.5:
        view = solarize(view)
    return view


def rgb_array(image: Image.Image | Tensor) -> Tensor:
    """A PIL image (any mode; decoded here if it was only opened) as an [H, W, 3] uint8 RGB tensor."""
    if isinstance(image, Tensor):
        return image
    return torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image))


def decode_jpeg(data: bytes) -> Tensor | None:
    """JPEG bytes -> [H, W, 3] uint8 RGB by OpenCV, EXIF orientation ignored (as PIL's `open` does); None when
    OpenCV is missing or cannot decode them."""
    if cv2 is None:
        return None
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if image is None:
        return None
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image))  # in place


class MultiCropTransform:
    """Official iBOT multi-crop views of one image: `cfg.num_global` global then `cfg.num_local` local crops.

    `__call__(image, seed)` takes a PIL image (any mode) or an [H, W, 3] uint8 RGB tensor and returns the G + L views
    as uint8 [3, S, S] tensors; the same (image, seed) always gives the same views, and no global RNG is read or
    changed. `normalise.normalise` makes the float32 model inputs of a stack of views.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.sizes = [cfg.global_size] * cfg.num_global + [cfg.local_size] * cfg.num_local

    def __call__(self, image: Image.Image | Tensor, seed: int) -> list[Tensor]:
        if cv2 is None:
            raise ImportError("data.augment=cpu needs OpenCV: pip install opencv-python-headless (a dependency of "
                              "ibot-engine), or train with data.augment=gpu")
        # One thread per process: the dataloader runs one worker per core (torch sets its own threads to 1 there),
        # and OpenCV's thread pool would only oversubscribe the cores. A process-wide setting, cheap to repeat.
        cv2.setNumThreads(1)
        pixels = rgb_array(image)
        params = view_param_rows(pixels.shape[0], pixels.shape[1], self.cfg, seed)
        return [torch.from_numpy(augment_view(pixels, row, size)).permute(2, 0, 1)
                for row, size in zip(params, self.sizes)]

