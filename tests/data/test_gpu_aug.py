"""GPU-path multi-crop ops (engine/data/gpu_aug.py), run on CPU tensors against torchvision references."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ibot_engine.config import DataConfig
from ibot_engine.data import gpu_aug as G
from ibot_engine.data.normalise import IMAGENET_MEAN, IMAGENET_STD
from ibot_engine.data.views import draw_view_params


def _images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _cfg(**overrides: object) -> DataConfig:
    return DataConfig(**{"global_size": 32, "local_size": 16, "num_local": 3, **overrides})


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """`count` of `n` Bernoulli(p) trials lies within `sigmas` standard deviations of n*p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


# ---------------------------------------------------------------------------------------------------------------
# Each op against torchvision's functional op, one sample at a time


@pytest.mark.parametrize(
    "ours,reference,low,high",
    [
        (G.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (G.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (G.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
        (G.adjust_hue, TF.adjust_hue, -0.1, 0.1),
    ],
)
def test_colour_ops_match_torchvision_per_sample(ours, reference, low: float, high: float) -> None:
    x = _images(16)
    x[0] = 0.5  # grey: hue undefined, saturation zero
    x[1, :, :2] = 1.0  # saturated highlights
    factors = torch.linspace(low, high, 16)
    out = ours(x, factors)
    for i in range(16):
        expected = reference(x[i], float(factors[i]))
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)


def test_grayscale_blur_solarize_match_torchvision() -> None:
    x = _images(6, size=20)
    torch.testing.assert_close(G.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    apply = torch.tensor([True, True, True, True, True, False])
    out = G.gaussian_blur(x, sigma, apply)
    for i in range(5):
        expected = TF.gaussian_blur(x[i], kernel_size=[G.BLUR_TAPS, G.BLUR_TAPS], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[5], x[5], atol=1e-6, rtol=0)  # not applied: unchanged
    flags = torch.tensor([True, False, True, False, True, False])
    out = G.solarize(x, flags)
    for i in range(6):
        expected = TF.solarize(x[i], threshold=128 / 255) if flags[i] else x[i]
        torch.testing.assert_close(out[i], expected)


def test_resized_crops_identity_and_area_average() -> None:
    images = [torch.randint(0, 256, (3, 8, 10), dtype=torch.uint8), torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)]
    crop = G.GpuMultiCrop(_cfg(num_global=2, num_local=0, global_size=4))
    canvas = torch.zeros((2, 3, 9, 11))
    for i, im in enumerate(images):  # the layout GpuMultiCrop builds (edge repeated once)
        h, w = im.shape[1:]
        canvas[i, :, :h, :w] = im
        canvas[i, :, :h, w] = im[:, :, -1].float()
        canvas[i, :, h, : w + 1] = canvas[i, :, h - 1, : w + 1]
    params = torch.zeros((1, 2, G.NUM_PARAMS))
    params[0, 0, G.P_BOX] = torch.tensor([2.0, 1.0, 8.0, 7.0])  # 6 x 6 window of image 0
    params[0, 1, G.P_BOX] = torch.tensor([0.0, 0.0, 6.0, 6.0])  # all of image 1, up to its far edges
    same = G.resized_crops(canvas, params, 6)
    torch.testing.assert_close(same[0], images[0][:, 1:7, 2:8].float())
    torch.testing.assert_close(same[1], images[1].float())
    half = G.resized_crops(canvas, params, 3)  # 2x2 samples per output pixel at pixel centres: area average
    torch.testing.assert_close(half[1], F.avg_pool2d(images[1].float()[None], 2)[0], atol=1e-4, rtol=0)
    assert crop.num_local == 0


# ---------------------------------------------------------------------------------------------------------------
# Random parameters: the official probabilities


def test_view_params_follow_the_official_probabilities() -> None:
    cfg = _cfg(num_global=2, num_local=2)
    n = 1500
    rows = torch.stack([draw_view_params(60 + i % 7, 80 - i % 5, cfg, seed=1000 + i) for i in range(n)])  # [n, V, P]
    expect_blur = [1.0, 0.1, 0.5, 0.5]
    expect_solarize = [0.0, 0.2, 0.0, 0.0]
    for v in range(4):
        r = rows[:, v]
        for column, p in ((G.P_FLIP, 0.5), (G.P_JITTER, 0.8), (G.P_GRAY, 0.2), (G.P_BLUR, expect_blur[v]),
                          (G.P_SOLARIZE, expect_solarize[v])):
            count = int(r[:, column].sum())
            assert _within(count, n, p), (v, column, count / n, p)
        assert torch.all((r[:, G.P_BRIGHTNESS] >= 0.6) & (r[:, G.P_BRIGHTNESS] <= 1.4))
        assert torch.all((r[:, G.P_CONTRAST] >= 0.6) & (r[:, G.P_CONTRAST] <= 1.4))
        assert torch.all((r[:, G.P_SATURATION] >= 0.8) & (r[:, G.P_SATURATION] <= 1.2))
        assert torch.all(r[:, G.P_HUE].abs() <= 0.1)
        assert torch.all((r[:, G.P_SIGMA] >= 0.1) & (r[:, G.P_SIGMA] <= 2.0))
        assert r[:, G.P_SIGMA].std() > 0.4  # spread over the range, U(0.1, 2) has std 0.55
        orders = r[:, G.P_ORDER].long()
        assert torch.all(orders.sort(dim=1).values == torch.arange(4))
        assert len({tuple(o) for o in orders.tolist()}) == 24  # every order of the 4 jitter ops occurs
        # Crop boxes inside the image, area fraction within the view's scale range (when the draw succeeded).
        heights = torch.tensor([60 + i % 7 for i in range(n)], dtype=torch.float32)
        widths = torch.tensor([80 - i % 5 for i in range(n)], dtype=torch.float32)
        x1, y1, x2, y2 = r[:, G.P_BOX].unbind(1)
        assert torch.all((x1 >= 0) & (y1 >= 0) & (x2 <= widths) & (y2 <= heights) & (x2 > x1) & (y2 > y1))
        area = (x2 - x1) * (y2 - y1) / (heights * widths)
        low, high = cfg.global_scale if v < 2 else cfg.local_scale
        inside = ((area >= low * 0.9) & (area <= high * 1.1)).float().mean()
        assert inside > 0.97, (v, inside)
    again = draw_view_params(60, 80, cfg, seed=1000)
    assert torch.equal(again, rows[0])  # seeded by the sample seed alone


def test_ops_apply_exactly_where_their_flags_say() -> None:
    """On outputs: grayscale iff its flag, solarize only where flagged, flip mirrors, no-op where nothing is drawn."""
    n = 400
    x = _images(n, size=10, seed=3)
    rows = torch.stack([draw_view_params(10, 10, _cfg(num_global=2, num_local=0), seed=i)[1] for i in range(n)])
    out = G.augment_crops(x, rows)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = out * std + mean
    assert torch.all(pixels > -1e-5) and torch.all(pixels < 1 + 1e-5)
    grey = (pixels.amax(1) - pixels.amin(1)).amax(dim=(1, 2)) < 1e-5
    assert torch.equal(grey, rows[:, G.P_GRAY] > 0.5)
    assert _within(int(grey.sum()), n, 0.2)
    # With jitter, grayscale and blur off, the output is the (flipped) input, solarized where flagged.
    plain = rows.clone()
    plain[:, G.P_JITTER] = plain[:, G.P_GRAY] = plain[:, G.P_BLUR] = 0
    out = G.augment_crops(x, plain) * std + mean
    flipped = torch.where((plain[:, G.P_FLIP] > 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    solarized = torch.where(flipped >= 128 / 255, 1 - flipped, flipped)
    expected = torch.where((plain[:, G.P_SOLARIZE] > 0.5).view(-1, 1, 1, 1), solarized, flipped)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert _within(int((plain[:, G.P_SOLARIZE] > 0.5).sum()), n, 0.2)
    assert _within(int((plain[:, G.P_FLIP] > 0.5).sum()), n, 0.5)


def test_jitter_order_is_honoured() -> None:
    """Brightness then contrast differs from contrast then brightness; each sample follows its own order."""
    x = _images(2, size=8, seed=5)
    params = torch.zeros((2, G.NUM_PARAMS))
    params[:, G.P_JITTER] = 1
    params[:, G.P_BRIGHTNESS] = 1.4
    params[:, G.P_CONTRAST] = 0.6
    params[:, G.P_SATURATION] = 1.0
    params[0, G.P_ORDER] = torch.tensor([0.0, 1, 2, 3])
    params[1, G.P_ORDER] = torch.tensor([1.0, 0, 2, 3])
    both = torch.cat([x[:1], x[:1]])
    out = G.color_jitter(both, params)
    first = TF.adjust_hue(TF.adjust_contrast(TF.adjust_brightness(x[0], 1.4), 0.6), 0.0)
    second = TF.adjust_hue(TF.adjust_brightness(TF.adjust_contrast(x[0], 0.6), 1.4), 0.0)
    torch.testing.assert_close(out[0], first, atol=2e-5, rtol=0)
    torch.testing.assert_close(out[1], second, atol=2e-5, rtol=0)
    assert not torch.allclose(first, second, atol=1e-3)


def test_jitter_variants_agree() -> None:
    """Once-per-sample indexing (host parameters) and whole-batch masking give the same images."""
    n = 64
    x = _images(n, size=8, seed=9)
    params = torch.stack([draw_view_params(8, 8, _cfg(), seed=50 + i)[2] for i in range(n)])
    indexed = G.color_jitter_indexed(x, params, params)
    masked = G.color_jitter_masked(x, params)
    torch.testing.assert_close(indexed, masked, atol=1e-6, rtol=0)
    assert (params[:, G.P_JITTER] > 0.5).any() and not torch.equal(indexed, x)


# ---------------------------------------------------------------------------------------------------------------
# The whole GPU path on CPU tensors


def _jpeg(seed: int, size: tuple[int, int]) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


def test_multicrop_shapes_ranges_and_determinism() -> None:
    cfg = _cfg(num_global=2, num_local=3)
    sizes = [(40, 30), (33, 50), (64, 64)]
    encoded = [_jpeg(i, s) for i, s in enumerate(sizes)]
    images, failed = G.decode_batch(encoded, torch.device("cpu"))
    assert failed == [] and [tuple(im.shape) for im in images] == [(3, h, w) for w, h in sizes]
    params = torch.stack([draw_view_params(h, w, cfg, seed=i) for i, (w, h) in enumerate(sizes)], dim=1)
    crop = G.GpuMultiCrop(cfg)
    global_crops, local_crops = crop(images, params)
    assert global_crops.shape == (2 * 3, 3, 32, 32) and local_crops.shape == (3 * 3, 3, 16, 16)
    low = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    for crops in (global_crops, local_crops):
        assert torch.all(crops >= low - 1e-4) and torch.all(crops <= high + 1e-4)
        assert crops.flatten(1).std(1).min() > 0
    again = crop(images, params)
    assert torch.equal(again[0], global_crops) and torch.equal(again[1], local_crops)
    # View-major: crop v*B + i is view v of image i, the same as cropping image i alone.
    alone_g, alone_l = crop(images[1:2], params[:, 1:2])
    torch.testing.assert_close(alone_g[1], global_crops[1 * 3 + 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone_l[2], local_crops[2 * 3 + 1], atol=1e-5, rtol=0)


def test_decode_batch_replaces_and_reports_undecodable_images() -> None:
    good = [_jpeg(i, (20, 16)) for i in range(3)]
    broken = good[1][: len(good[1]) // 2].clone()
    images, failed = G.decode_batch([good[0], broken, good[2]], torch.device("cpu"))
    assert failed == [1] and len(images) == 3
    assert torch.equal(images[1], images[0])  # the slot reuses the previous good image


@pytest.mark.gpu
def test_cuda_ops_match_cpu_ops() -> None:
    """The same images and parameters give the same crops on CUDA as on the CPU (GPU sessions: pytest -m gpu)."""
    cfg = _cfg(num_global=2, num_local=4)
    sizes = [(500, 375), (375, 500), (320, 240)]
    encoded = [_jpeg(i, s) for i, s in enumerate(sizes)]
    cpu_images, _ = G.decode_batch(encoded, torch.device("cpu"))
    gpu_images, failed = G.decode_batch(encoded, torch.device("cuda"))
    assert failed == [] and all(im.is_cuda for im in gpu_images)
    for a, b in zip(cpu_images, gpu_images):  # nvJPEG and libjpeg-turbo may differ by a few levels
        assert (a.int() - b.cpu().int()).abs().float().mean() < 2
    params = torch.stack([draw_view_params(h, w, cfg, seed=i) for i, (w, h) in enumerate(sizes)], dim=1)
    crop = G.GpuMultiCrop(cfg)
    on_cpu = crop(cpu_images, params)
    on_gpu = crop([im.cuda() for im in cpu_images], params)
    for a, b in zip(on_cpu, on_gpu):
        torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=0)


def test_one_huge_image_does_not_size_the_batch_canvas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The canvas is bounded by B x 3 x (max_side + 1)^2 (max_side = 2 x global_size): an 800 x 600 image is
    resized first, its boxes scaled, and its crops stay those of the full-size image (a smooth one here, so the
    resampling differs only slightly). Images within the bound are untouched."""
    cfg = _cfg(num_global=2, num_local=3)  # global 32 px: max_side 64
    h, w = 600, 800
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    huge = (torch.stack([xs, ys, (xs + ys) / 2]) * 255).round().to(torch.uint8)
    small = (torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    params = torch.stack([draw_view_params(30, 40, cfg, seed=0), draw_view_params(h, w, cfg, seed=1)], dim=1)
    canvases = []
    real = G.resized_crops
    monkeypatch.setattr(G, "resized_crops", lambda canvas, *a: canvases.append(canvas.shape) or real(canvas, *a))
    crop = G.GpuMultiCrop(cfg)
    global_crops, local_crops = crop([small, huge], params.clone())
    assert crop.max_side == 64 and all(c[2] <= 65 and c[3] <= 65 for c in canvases)
    unbounded = G.GpuMultiCrop(cfg)
    unbounded.max_side = 10**6
    full_g, full_l = unbounded([small, huge], params.clone())
    assert canvases[-1][3] == w + 1  # the unbounded canvas is as wide as the huge image
    view_rows = [v * 2 + i for v in range(2) for i in range(2)]
    small_rows = [r for r in view_rows if r % 2 == 0]
    huge_rows = [r for r in view_rows if r % 2 == 1]
    assert torch.equal(global_crops[small_rows], full_g[small_rows])  # within the bound: untouched
    torch.testing.assert_close(global_crops[huge_rows], full_g[huge_rows], atol=0.05, rtol=0)
    torch.testing.assert_close(local_crops[1::2], full_l[1::2], atol=0.05, rtol=0)
