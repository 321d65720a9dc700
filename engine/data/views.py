"""The random parameters of a sample's multi-crop views: one law for both augmenters.

The official iBOT recipe (`DataAugmentationiBOT` in bytedance/ibot `main_ibot.py`) per view: a random resized crop
(area fraction ~ U(`data.global_scale` / `data.local_scale`), log aspect ratio ~ U(log 3/4, log 4/3), with the 10
tries and centre-crop fallback of torchvision's `RandomResizedCrop.get_params`), flip p=0.5, ColorJitter(0.4, 0.4,
0.2, 0.1) p=0.8 with its four factors (brightness, contrast ~ U(0.6, 1.4), saturation ~ U(0.8, 1.2), hue ~
U(-0.1, 0.1)) applied in a uniformly random order, grayscale p=0.2, Gaussian blur with sigma ~ U(0.1, 2) at p=1.0 /
0.1 / 0.5 for global view 1 / global view 2 / locals, solarize (threshold 128) p=0.2 on global view 2. The CPU
augmenter (cpu_aug.py) applies these parameters to uint8 arrays in the workers, the GPU augmenter (gpu_aug.py)
to batches on the device.

The laws are written out here on explicit uniforms rather than taken from torchvision's sampler, which draws from
the global generator one number at a time (12 views cost 2.8 ms per image that way, ~0.1 ms here);
tests/data/test_cpu_aug.py checks them against torchvision's own draws and the official laws.

Parameter layout: `draw_view_params` returns a [V, NUM_PARAMS] float32 tensor per sample (V = G + L views);
columns are named by the P_* constants below.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ibot_engine.config import DataConfig

# Columns of a view's parameter row.
P_BOX = slice(0, 4)  # x1, y1, x2, y2 in pixels of the source image
P_FLIP = 4
P_JITTER = 5
P_ORDER = slice(6, 10)  # the permutation of (brightness, contrast, saturation, hue) ids 0..3
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 10, 11, 12, 13
P_GRAY = 14
P_BLUR = 15
P_SIGMA = 16
P_SOLARIZE = 17
NUM_PARAMS = 18

JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (official)
P_FLIP_APPLY = 0.5  # the jitter, grey, blur and solarize probabilities are DataConfig fields (official defaults)
SIGMA_RANGE = (0.1, 2.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10  # torchvision's RandomResizedCrop
_CROP_UNIFORMS = 4 * _CROP_TRIES
_UNIFORMS_PER_VIEW = _CROP_UNIFORMS + 14  # flip, jitter, 4 factors, grey, blur, sigma, solarize, 4 for the order


def view_probabilities(cfg: DataConfig) -> list[tuple[float, float]]:
    """(blur p, solarize p) of each of the G + L views: global views alternate the two official pipelines."""
    blur_1, blur_2, blur_local = cfg.blur_prob
    globals_ = [(blur_1, 0.0) if g % 2 == 0 else (blur_2, cfg.solarize_prob) for g in range(cfg.num_global)]
    return globals_ + [(blur_local, 0.0)] * cfg.num_local


def crop_box(height: int, width: int, scale: tuple[float, float], u: list[float]) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` law, from the uniforms `u` (4 per try, 40 in all).

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log 3/4, log 4/3)); the first box that fits
    is placed uniformly; if none fits, the centre crop of the whole image with the ratio clamped to [3/4, 4/3].
    Returns (left, top, right, bottom) in pixels.
    """
    area = height * width
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    for t in range(_CROP_TRIES):
        u_area, u_ratio, u_top, u_left = u[4 * t: 4 * t + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_top * (height - h + 1))  # uniform on 0 .. height - h
            left = int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def draw_view_params(height: int, width: int, cfg: DataConfig, seed: int) -> Tensor:
    """Random parameters of the G + L views of one `height` x `width` image, [V, NUM_PARAMS] float32."""
    return torch.tensor(view_param_rows(height, width, cfg, seed), dtype=torch.float32)


def view_param_rows(height: int, width: int, cfg: DataConfig, seed: int) -> list[list[float]]:
    """`draw_view_params` as V Python lists (indexable by the P_* columns), from the sample's `seed` alone.

    One `torch.Generator` seeded with `seed` draws a fixed number of float64 uniforms per view (whatever the
    probabilities and however many crop tries are needed), so a view's numbers depend only on (seed, view), and
    no global RNG is read or changed. The laws are the official ones (module docstring).
    """
    probs = view_probabilities(cfg)
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand((len(probs), _UNIFORMS_PER_VIEW), dtype=torch.float64, generator=generator).tolist()
    b, c, s, hue = JITTER
    rows = []
    for v, ((p_blur, p_solarize), u) in enumerate(zip(probs, uniforms)):
        scale = cfg.global_scale if v < cfg.num_global else cfg.local_scale
        box = crop_box(height, width, scale, u[:_CROP_UNIFORMS])
        u = u[_CROP_UNIFORMS:]
        order = sorted(range(4), key=lambda k: u[10 + k])  # argsort of 4 iid uniforms: a uniform permutation
        row = [0.0] * NUM_PARAMS
        row[P_BOX] = box
        row[P_FLIP] = float(u[0] < P_FLIP_APPLY)
        row[P_JITTER] = float(u[1] < cfg.color_jitter_prob)
        row[P_ORDER] = order
        row[P_BRIGHTNESS] = 1 - b + 2 * b * u[2]
        row[P_CONTRAST] = 1 - c + 2 * c * u[3]
        row[P_SATURATION] = 1 - s + 2 * s * u[4]
        row[P_HUE] = -hue + 2 * hue * u[5]
        row[P_GRAY] = float(u[6] < cfg.grayscale_prob)
        row[P_BLUR] = float(u[7] < p_blur)
        row[P_SIGMA] = SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * u[8]
        row[P_SOLARIZE] = float(u[9] < p_solarize)
        rows.append(row)
    return rows
