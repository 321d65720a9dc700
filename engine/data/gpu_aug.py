"""The iBOT multi-crop recipe as batched tensor ops: decode and augment on the training device.

The CPU path (cpu_aug.py) augments each image in the dataloader workers (uint8 arrays, OpenCV and torch
kernels); even at its ~100 img/s per core a 16-core node feeds less than one H100 consumes. On this path the
workers only read the shards, check each JPEG, and draw the random parameters of every view (cheap, per sample,
seeded by the sample's own seed as on the CPU path); the training process then decodes the batch
(`torchvision.io.decode_jpeg` on a list: nvJPEG on CUDA) and applies the same recipe to all crops at once.

The ops are plain torch, so the very same code runs on CPU tensors (tests, `--device cpu` benchmark smoke).

Recipe (official `DataAugmentationiBOT`, views.py draws the parameters): per view a random resized crop (scale from
`data.global_scale` / `data.local_scale`, ratio 3/4..4/3, torchvision's own `get_params`), flip p=0.5,
ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 in a random order per sample, grayscale p=0.2, Gaussian blur
(sigma ~ U(0.1, 2)) p=1.0 / 0.1 / 0.5 for global view 1 / global view 2 / locals, solarize p=0.2 on global view 2,
ImageNet normalisation. Differences from the CPU path, all small: the crop is resampled by `roi_align`
(bilinear, averaging ceil(crop / output) samples per output pixel in each direction, i.e. anti-aliased) rather
than bicubic; colour ops run on float pixels rather than on uint8; the blur is a separable Gaussian with a
13-tap kernel (covers 3 sigma at sigma = 2) and reflect padding rather than edge replication.

Parameter layout: `views.draw_view_params` returns a [V, NUM_PARAMS] float32 tensor per sample (V = G + L views);
the collate stacks them view-major to [V, B, NUM_PARAMS]. Columns are named by the P_* constants of views.py.

Shapes: images B uint8 [3, H_i, W_i] (sizes differ) -> global [G*B, 3, Hg, Wg], local [L*B, 3, Hl, Wl] float32,
normalised, view-major (all B images of view 0, then view 1, ...), as `Batch` wants them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from ibot_engine.config import DataConfig
from ibot_engine.data.normalise import IMAGENET_MEAN, IMAGENET_STD
from ibot_engine.data.views import (
    NUM_PARAMS,
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
    SIGMA_RANGE,
)

BLUR_TAPS = 2 * math.ceil(3 * SIGMA_RANGE[1]) + 1  # 13: covers 3 sigma at sigma = 2

# ---------------------------------------------------------------------------------------------------------------
# Decode


def decode_batch(data: list[Tensor], device: torch.device) -> tuple[list[Tensor], list[int]]:
    """Decode encoded JPEGs (1-D uint8 CPU tensors) on `device` in one call; returns (images, failed positions).

    A batch call that fails (one bad file fails the whole call) is redone image by image; each image that still
    fails is replaced by the previous good image of the batch, and its position is returned so the caller can
    count it as skipped (the batch keeps its size: every rank must have the same B).
    """
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device)), []
    except RuntimeError:
        pass
    images: list[Tensor | None] = []
    failed = []
    for i, encoded in enumerate(data):
        try:
            images.append(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            images.append(None)
            failed.append(i)
    good = [im for im in images if im is not None]
    if not good:
        raise RuntimeError("no image of the batch could be decoded")
    filled = []
    last = good[0]
    for im in images:
        last = im if im is not None else last
        filled.append(last)
    return filled, failed


# ---------------------------------------------------------------------------------------------------------------
# Batched per-sample ops on float images [N, 3, H, W] in [0, 1]; factors / flags are [N] tensors.


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, torchvision's weights: [N, 1, H, W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_sample(factor)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    f = _per_sample(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = (
        torch.stack((v, t, p), 1), torch.stack((q, v, p), 1), torch.stack((p, v, t), 1),
        torch.stack((p, q, v), 1), torch.stack((t, p, v), 1), torch.stack((v, p, q), 1),
    )
    out = choices[0]
    for k in range(1, 6):
        out = torch.where((i == k).unsqueeze(1), choices[k], out)
    return out


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1)).clamp(0, 1)


_JITTER_OPS = (
    (P_BRIGHTNESS, lambda x, f: adjust_brightness(x, f)),
    (P_CONTRAST, lambda x, f: adjust_contrast(x, f)),
    (P_SATURATION, lambda x, f: adjust_saturation(x, f)),
    (P_HUE, lambda x, f: adjust_hue(x, f)),
)


def color_jitter(x: Tensor, params: Tensor, host_params: Tensor | None = None, owned: bool = False) -> Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with probability, each sample in its own random order.

    With the parameters on the host (`host_params`, or `params` itself on CPU) each op runs once per sample
    (`color_jitter_indexed`); otherwise every op runs on the whole batch at every position (`color_jitter_masked`).
    """
    host = host_params if host_params is not None else (params if params.device.type == "cpu" else None)
    return color_jitter_masked(x, params) if host is None else color_jitter_indexed(x, params, host, owned)


def color_jitter_masked(x: Tensor, params: Tensor) -> Tensor:
    """16 whole-batch op evaluations selected by torch.where: no host data needed, 4x the work."""
    apply = params[:, P_JITTER] > 0.5
    order = params[:, P_ORDER].long()
    for position in range(4):
        for op_id, (column, op) in enumerate(_JITTER_OPS):
            chosen = apply & (order[:, position] == op_id)
            x = torch.where(_per_sample(chosen), op(x, params[:, column]), x)
    return x


def color_jitter_indexed(x: Tensor, params: Tensor, host: Tensor, owned: bool = False) -> Tensor:
    """Each op on the samples that take it at each position (index_select, then index_copy_ in place); the index
    lists are built from the host copy `host` of `params`, so there is no device sync. `owned`: x may be
    overwritten (else one copy is made first)."""
    x = x if owned else x.clone()
    apply = host[:, P_JITTER] > 0.5
    order = host[:, P_ORDER].long()
    for position in range(4):
        for op_id, (column, op) in enumerate(_JITTER_OPS):
            rows = torch.nonzero(apply & (order[:, position] == op_id)).flatten()  # host tensor
            if rows.numel() == 0:
                continue
            rows = rows.to(x.device, non_blocking=True)
            x.index_copy_(0, rows, op(x.index_select(0, rows), params[:, column].index_select(0, rows)))
    return x


def gaussian_kernels(sigma: Tensor, apply: Tensor, taps: int = BLUR_TAPS) -> Tensor:
    """[N, taps] normalised 1-D Gaussians; a unit impulse where `apply` is false."""
    radius = taps // 2
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    impulse = (offsets == 0).to(sigma.dtype).expand_as(kernels)
    return torch.where(apply[:, None], kernels, impulse)


def gaussian_blur(x: Tensor, sigma: Tensor, apply: Tensor) -> Tensor:
    """Separable Gaussian blur, one sigma per sample, reflect padding; samples with `apply` false pass unchanged."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma.to(x.dtype), apply)
    taps = k.shape[1]
    weight = k.repeat_interleave(c, dim=0)  # [N*C, taps]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (taps // 2, taps // 2, 0, 0), mode="reflect"), weight.view(n * c, 1, 1, taps), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, taps // 2, taps // 2), mode="reflect"), weight.view(n * c, 1, taps, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: Tensor, apply: Tensor, threshold: float = 128 / 255) -> Tensor:
    return torch.where(_per_sample(apply) & (x >= threshold), 1 - x, x)


def augment_crops(x: Tensor, params: Tensor, host_params: Tensor | None = None) -> Tensor:
    """Flip, colour jitter, grayscale, blur, solarize and normalise crops [N, 3, H, W] in [0, 1].

    `params` [N, NUM_PARAMS] on x's device; `host_params` the same on the CPU when available (see color_jitter)."""
    x = torch.where(_per_sample(params[:, P_FLIP] > 0.5), x.flip(-1), x)
    x = color_jitter(x, params, host_params, owned=True)  # x is the flip's output: ours to overwrite
    x = torch.where(_per_sample(params[:, P_GRAY] > 0.5), grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, params[:, P_SIGMA], params[:, P_BLUR] > 0.5)
    x = solarize(x, params[:, P_SOLARIZE] > 0.5)
    mean, std = _normalisation(x.device, x.dtype)
    return (x - mean) / std


@functools.cache
def _normalisation(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as [1, 3, 1, 1] tensors on `device`: copied there once, not at every batch."""
    return (torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1).to(device),
            torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1).to(device))


def resized_crops(canvas: Tensor, params: Tensor, out_size: int) -> Tensor:
    """Crops of the padded batch `canvas` [B, 3, Hmax + 1, Wmax + 1] (float) to out_size^2.

    `params` [V, B, NUM_PARAMS] view-major. Boxes are in pixel-edge coordinates (pixel i spans [i, i + 1]), hence
    `aligned=True`; the canvas must repeat each image's last row and column once past its edge (GpuMultiCrop).
    """
    views, b, _ = params.shape
    boxes = params[..., P_BOX].reshape(views * b, 4)
    image_index = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat(views)
    rois = torch.cat((image_index[:, None], boxes), dim=1)
    return roi_align(canvas, rois, (out_size, out_size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class GpuMultiCrop:
    """Batched multi-crop of uint8 images on their device: `(images, params) -> (global_crops, local_crops)`.

    Memory bound: every image is pasted into one float32 canvas [B, 3, S + 1, S + 1], S the largest side in the
    batch, so a single huge image would size the whole batch's canvas (a 2,000 px image in a batch of 64: 3 GB).
    Images with a side above `max_side` = 2 x the global crop size are therefore first resized (bilinear,
    antialiased) to fit it, and their crop boxes scaled with them: the canvas never exceeds B x 3 x (max_side + 1)^2
    floats (156 MB at B = 64, 224 px crops). For images of ordinary aspect ratios this loses nothing the crops keep:
    with the default scales, the smallest global crop of a max_side square image still spans 224 source pixels and
    the smallest local crop 100. A very elongated image (say 1:10) loses resolution along its short side.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.num_global = cfg.num_global
        self.num_local = cfg.num_local
        self.global_size = cfg.global_size
        self.local_size = cfg.local_size
        self.max_side = 2 * cfg.global_size

    def _fit(self, images: list[Tensor], params: Tensor) -> tuple[list[Tensor], Tensor]:
        """Images with a side above `max_side` resized to fit (float), with their boxes in `params` scaled."""
        if max(max(im.shape[1], im.shape[2]) for im in images) <= self.max_side:
            return images, params
        params, fitted = params.clone(), []
        for i, im in enumerate(images):
            h, w = im.shape[1], im.shape[2]
            if max(h, w) <= self.max_side:
                fitted.append(im)
                continue
            scale = self.max_side / max(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            fitted.append(F.interpolate(im[None].float(), size=size, mode="bilinear", antialias=True,
                                        align_corners=False)[0])
            box_scale = torch.tensor([size[1] / w, size[0] / h] * 2, dtype=params.dtype)  # host numbers, host params
            params[:, i, P_BOX] *= box_scale.to(params.device)
        return fitted, params

    def __call__(self, images: list[Tensor], params: Tensor) -> tuple[Tensor, Tensor]:
        b = len(images)
        device = images[0].device
        images, params = self._fit(images, params)
        height = max(im.shape[1] for im in images)
        width = max(im.shape[2] for im in images)
        # One spare row and column: each image's last row / column is repeated past its edge, so bilinear
        # samples in the last half pixel read the image itself (edge replication), never another image's padding.
        canvas = torch.zeros((b, 3, height + 1, width + 1), dtype=torch.float32, device=device)
        for i, im in enumerate(images):  # a few copies per image; sizes differ
            h, w = im.shape[1], im.shape[2]
            canvas[i, :, :h, :w] = im
            canvas[i, :, :h, w] = im[:, :, -1]
            canvas[i, :, h, : w + 1] = canvas[i, :, h - 1, : w + 1]
        canvas /= 255.0
        host = params if params.device.type == "cpu" else None
        params = params.to(device, non_blocking=True)
        g = self.num_global
        global_params = params[:g]
        global_crops = resized_crops(canvas, global_params, self.global_size).clamp_(0, 1)
        global_crops = augment_crops(global_crops, global_params.reshape(g * b, NUM_PARAMS),
                                     host[:g].reshape(g * b, NUM_PARAMS) if host is not None else None)
        if self.num_local:
            local_params = params[g:]
            local_crops = resized_crops(canvas, local_params, self.local_size).clamp_(0, 1)
            local_crops = augment_crops(local_crops, local_params.reshape(self.num_local * b, NUM_PARAMS),
                                        host[g:].reshape(self.num_local * b, NUM_PARAMS) if host is not None else None)
        else:
            local_crops = canvas.new_empty((0, 3, self.local_size, self.local_size))
        return global_crops, local_crops
