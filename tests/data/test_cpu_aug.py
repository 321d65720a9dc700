"""The CPU multi-crop (engine/data/cpu_aug.py) against the official recipe: each op against the official (PIL)
op on the same parameters, and the parameter law (engine/data/views.py) against the official laws.

Tolerances are in uint8 levels (0..255), max and mean absolute difference over the image, measured on smooth
random images with a little noise (photograph-like: most energy at low frequencies):
* exact (0): flip, brightness, contrast, solarize (the same lookup tables as PIL's blends);
* <= 1 level, mean <= 0.05: saturation and grayscale (OpenCV's fixed-point luma vs PIL's), the blur against an exact
  Gaussian (torchvision's kernel to 4 sigma, edges replicated);
* <= 2 levels, mean <= 0.05: crop + resize (torch's uint8 antialiased bicubic vs PIL's);
* hue: 8-bit HSV round trips lose up to ~15 levels on dark saturated pixels in PIL and in OpenCV alike; against
  torchvision's float hue, ours must stay within 16 levels, 1 on average, and be no further on average over the
  factors than PIL's own round trip; against PIL, within 2 levels on average;
* blur against PIL's GaussianBlur (the official op, three stacked box blurs): mean <= 1 level, max <= 16.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from scipy import stats
from torchvision import transforms as T1
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F2

from ibot_engine.bench.official_aug import OfficialMultiCrop
from ibot_engine.config import DataConfig
from ibot_engine.data import cpu_aug as C
from ibot_engine.data import views as V
from ibot_engine.data.normalise import normalise

P_MIN = 1e-3  # a law is rejected below this p-value; every test has fixed seeds, so none is flaky


def _smooth_image(seed: int, size: tuple[int, int] = (120, 90)) -> np.ndarray:
    """[H, W, 3] uint8: bicubic-upsampled 6 x 5 random colours plus +-12 levels of noise."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)).astype(np.int16)
    return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


IMAGES = [_smooth_image(seed) for seed in range(3)]


def _diff(ours: np.ndarray, reference: Image.Image | np.ndarray) -> tuple[int, float]:
    d = np.abs(ours.astype(np.int16) - np.asarray(reference).astype(np.int16))
    return int(d.max()), float(d.mean())


# ---------------------------------------------------------------------------------------------------------------
# Each op against the official op on the same parameters


@pytest.mark.parametrize("image", IMAGES)
def test_crop_resize_matches_pil_bicubic(image: np.ndarray) -> None:
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    # Down by up to 3x (antialiased), about 1:1 and up by 2x; square and elongated boxes.
    for left, top, right, bottom, size in [(0, 0, w, h, 40), (10, 5, 100, 80, 32), (3, 3, 50, 40, 96),
                                           (20, 10, 60, 50, 40), (0, 0, 120, 30, 48), (5, 7, 29, 31, 48)]:
        ours = C.resized_crop(torch.from_numpy(image), (left, top, right, bottom), size)
        reference = F1.resized_crop(pil, top, left, bottom - top, right - left, [size, size],
                                    T1.InterpolationMode.BICUBIC)
        worst, mean = _diff(ours, reference)
        assert ours.shape == (size, size, 3)
        assert worst <= 2 and mean <= 0.05, (left, top, right, bottom, size, worst, mean)


@pytest.mark.parametrize("image", IMAGES)
def test_pointwise_colour_ops_match_pil(image: np.ndarray) -> None:
    pil = Image.fromarray(image)
    assert _diff(C.flip(image), F1.hflip(pil)) == (0, 0.0)
    assert _diff(C.solarize(image), ImageOps.solarize(pil, 128)) == (0, 0.0)
    for factor in np.linspace(0.6, 1.4, 9):
        assert _diff(C.adjust_brightness(image, factor), F1.adjust_brightness(pil, factor)) == (0, 0.0), factor
        assert _diff(C.adjust_contrast(image, factor), F1.adjust_contrast(pil, factor)) == (0, 0.0), factor
    for factor in np.linspace(0.8, 1.2, 9):
        worst, mean = _diff(C.adjust_saturation(image, factor), F1.adjust_saturation(pil, factor))
        assert worst <= 1 and mean <= 0.05, (factor, worst, mean)
    worst, mean = _diff(C.grayscale(image), F1.rgb_to_grayscale(pil, num_output_channels=3))
    assert worst <= 1 and mean <= 0.05


@pytest.mark.parametrize("image", IMAGES)
def test_hue_is_as_close_to_the_float_hue_as_pil(image: np.ndarray) -> None:
    pil = Image.fromarray(image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    ours_vs_exact, pil_vs_exact = [], []
    for factor in np.linspace(-0.1, 0.1, 9):
        exact = F2.adjust_hue(chw, float(factor)).permute(1, 2, 0).numpy()  # float HSV, rounded once
        official = F1.adjust_hue(pil, float(factor))
        worst, mean = _diff(C.adjust_hue(image, factor), exact)
        assert worst <= 16 and mean <= 1.0, (factor, worst, mean)
        ours_vs_exact.append(mean)
        pil_vs_exact.append(_diff(np.asarray(official), exact)[1])
        assert _diff(C.adjust_hue(image, factor), official)[1] <= 2.0, factor
    # Both quantise the shift (ours to 1/256 turn, PIL's to 1/255) and the HSV planes to 8 bits.
    assert np.mean(ours_vs_exact) <= np.mean(pil_vs_exact), (ours_vs_exact, pil_vs_exact)
    # A visible rotation: red -> yellow-ish for +0.1 turn (36 degrees), blue-ish for -0.1.
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    assert C.adjust_hue(red, 0.1)[0, 0, 1] > 100 and C.adjust_hue(red, -0.1)[0, 0, 2] > 100


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.5, 2.0])
def test_blur_is_a_gaussian_of_that_sigma(sigma: float) -> None:
    for image in IMAGES:
        ours = C.gaussian_blur(image, sigma)
        k = 2 * math.ceil(4 * sigma) + 1
        padded = F.pad(torch.from_numpy(image).permute(2, 0, 1)[None].float(), (k // 2,) * 4, mode="replicate")[0]
        exact = F2.gaussian_blur(padded, [k, k], [sigma, sigma])[:, k // 2: -(k // 2), k // 2: -(k // 2)]
        worst, mean = _diff(ours, exact.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        assert worst <= 1 and mean <= 0.05, (sigma, worst, mean)
        worst, mean = _diff(ours, Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
        assert worst <= 16 and mean <= 1.0, (sigma, worst, mean)


def test_augment_view_applies_the_ops_its_row_names() -> None:
    """A row with every flag set equals the ops by hand, in the row's jitter order; a row with none is the crop."""
    image = IMAGES[0]
    pixels = torch.from_numpy(image)
    row = [0.0] * V.NUM_PARAMS
    row[V.P_BOX] = [4, 6, 84, 76]
    row[V.P_ORDER] = [3, 1, 0, 2]
    row[V.P_BRIGHTNESS], row[V.P_CONTRAST], row[V.P_SATURATION], row[V.P_HUE] = 1.2, 0.7, 1.1, -0.05
    row[V.P_SIGMA] = 0.8
    crop = C.resized_crop(pixels, (4, 6, 84, 76), 32)
    assert np.array_equal(C.augment_view(pixels, row, 32), crop)
    for flag in (V.P_FLIP, V.P_JITTER, V.P_GRAY, V.P_BLUR, V.P_SOLARIZE):
        row[flag] = 1.0
    expected = C.flip(crop)
    for op, factor in ((C.adjust_hue, -0.05), (C.adjust_contrast, 0.7), (C.adjust_brightness, 1.2),
                       (C.adjust_saturation, 1.1)):
        expected = op(expected, factor)
    expected = C.solarize(C.gaussian_blur(C.grayscale(expected), 0.8))
    assert np.array_equal(C.augment_view(pixels, row, 32), expected)


def test_views_are_close_to_the_official_transforms_on_average() -> None:
    """The whole recipe, official (PIL + torchvision v1) vs ours, over 150 seeds of one image: per view kind, the
    mean and spread of the normalised pixels agree (a crop law, a probability or an op off would move them)."""
    cfg = DataConfig(global_size=32, local_size=16, num_local=2)
    image = _smooth_image(7, size=(80, 60))
    pil = Image.fromarray(image)
    ours, official = C.MultiCropTransform(cfg), OfficialMultiCrop(cfg)
    stats_ours, stats_official = [], []
    for seed in range(150):
        views = ours(pil, seed)
        stats_ours.append([normalise(torch.stack(views[:1])), normalise(torch.stack(views[1:2])),
                           normalise(torch.stack(views[2:]))])
        ref = official(pil, seed)
        stats_official.append([ref[0][None], ref[1][None], torch.stack(ref[2:])])
    for kind in range(3):
        a = torch.cat([s[kind] for s in stats_ours])
        b = torch.cat([s[kind] for s in stats_official])
        assert abs(float(a.mean() - b.mean())) < 0.08, (kind, float(a.mean()), float(b.mean()))
        assert abs(float(a.std() - b.std())) < 0.08, (kind, float(a.std()), float(b.std()))


# ---------------------------------------------------------------------------------------------------------------
# The parameter law against the official laws


def _rows(n: int, cfg: DataConfig, height: int, width: int, seed0: int = 0) -> np.ndarray:
    return np.array([V.view_param_rows(height, width, cfg, seed0 + i) for i in range(n)])  # [n, V, P]


def _torchvision_boxes(n: int, height: int, width: int, scale: tuple[float, float]) -> np.ndarray:
    """n draws of torchvision's own RandomResizedCrop.get_params, as (left, top, right, bottom)."""
    shape_only = torch.empty((3, height, width), device="meta")
    torch.manual_seed(0)
    boxes = []
    for _ in range(n):
        top, left, h, w = T1.RandomResizedCrop.get_params(shape_only, list(scale), [3 / 4, 4 / 3])
        boxes.append((left, top, left + w, top + h))
    return np.array(boxes, dtype=np.float64)


def _box_features(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    left, top, right, bottom = boxes.T
    w, h = right - left, bottom - top
    return {"area": w * h / (height * width), "log_ratio": np.log(w / h),
            "left": left / np.maximum(width - w, 1), "top": top / np.maximum(height - h, 1)}


@pytest.mark.parametrize("height,width,scale", [(375, 500, (0.25, 1.0)), (375, 500, (0.05, 0.25)),
                                                (40, 400, (0.25, 1.0))])  # 1:10: many tries fail, fallbacks
def test_crop_law_is_torchvision_s(height: int, width: int, scale: tuple[float, float]) -> None:
    n = 4000
    cfg = DataConfig(global_scale=scale, num_global=1, num_local=0)
    ours = _box_features(_rows(n, cfg, height, width)[:, 0, V.P_BOX], height, width)
    theirs = _box_features(_torchvision_boxes(n, height, width, scale), height, width)
    for name in ours:
        p = stats.ks_2samp(ours[name], theirs[name]).pvalue
        assert p > P_MIN, (name, p)
    # The test has the power to see a wrong law: a uniform (not log-uniform) ratio is rejected.
    if width == 500:
        wrong = np.log(np.random.default_rng(0).uniform(3 / 4, 4 / 3, n))
        assert stats.ks_2samp(wrong, theirs["log_ratio"]).pvalue < P_MIN


def test_flags_factors_sigma_and_order_follow_the_official_laws() -> None:
    n = 6000
    cfg = DataConfig(num_global=2, num_local=2)
    rows = _rows(n, cfg, 60, 80, seed0=10_000)
    blur_p, solarize_p = [1.0, 0.1, 0.5, 0.5], [0.0, 0.2, 0.0, 0.0]
    uniform_laws = {V.P_BRIGHTNESS: (0.6, 1.4), V.P_CONTRAST: (0.6, 1.4), V.P_SATURATION: (0.8, 1.2),
                    V.P_HUE: (-0.1, 0.1), V.P_SIGMA: (0.1, 2.0)}
    for v in range(4):
        r = rows[:, v]
        for column, p in ((V.P_FLIP, 0.5), (V.P_JITTER, 0.8), (V.P_GRAY, 0.2), (V.P_BLUR, blur_p[v]),
                          (V.P_SOLARIZE, solarize_p[v])):
            k = int(r[:, column].sum())
            if p in (0.0, 1.0):
                assert k == n * p, (v, column, k)
            else:
                assert stats.binomtest(k, n, p).pvalue > P_MIN, (v, column, k / n, p)
        for column, (low, high) in uniform_laws.items():
            p = stats.kstest(r[:, column], stats.uniform(loc=low, scale=high - low).cdf).pvalue
            assert p > P_MIN, (v, column, p)
        # The jitter order: each of the 24 permutations of (brightness, contrast, saturation, hue) equally likely.
        orders = r[:, V.P_ORDER].astype(int)
        assert np.all(np.sort(orders, axis=1) == np.arange(4))
        codes = orders @ np.array([64, 16, 4, 1])
        counts = np.array([np.sum(codes == c) for c in np.unique(codes)])
        assert len(counts) == 24
        assert stats.chisquare(counts).pvalue > P_MIN
    # Views are independent of each other: flips of two views agree half the time.
    assert stats.binomtest(int(np.sum(rows[:, 0, V.P_FLIP] == rows[:, 2, V.P_FLIP])), n, 0.5).pvalue > P_MIN


def test_params_depend_on_the_seed_alone() -> None:
    cfg = DataConfig()
    torch.manual_seed(1)
    first = V.draw_view_params(375, 500, cfg, seed=2**63 + 5)  # sample seeds are 64-bit
    state = torch.get_rng_state()
    torch.manual_seed(2)
    assert torch.equal(first, V.draw_view_params(375, 500, cfg, seed=2**63 + 5))
    torch.manual_seed(1)
    V.draw_view_params(375, 500, cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is neither read nor advanced
    assert not torch.equal(first, V.draw_view_params(375, 500, cfg, seed=2**63 + 6))


def test_without_opencv_the_engine_imports_and_says_what_to_install() -> None:
    """OpenCV is a dependency, but an image without it (the GPU device's) must still import the engine and run
    data.augment=gpu; data.augment=cpu then fails on its first image with the fix in the message."""
    code = (
        "import sys; sys.modules['cv2'] = None\n"
        "import ibot_engine.data.stream, ibot_engine.data.augment\n"
        "from ibot_engine.config import DataConfig\n"
        "from ibot_engine.data.cpu_aug import MultiCropTransform\n"
        "import torch\n"
        "try:\n"
        "    MultiCropTransform(DataConfig())(torch.zeros((40, 40, 3), dtype=torch.uint8), 0)\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install opencv-python-headless" in result.stdout and "data.augment=gpu" in result.stdout


def test_shard_jpegs_decode_to_pil_s_pixels() -> None:
    """From shards, complete JPEGs are decoded by OpenCV: the same pixels as PIL's (4:2:0, 4:4:4, grey, an EXIF
    orientation PIL does not apply); truncated or non-JPEG bytes go to PIL, which raises on truncation."""
    import io

    from ibot_engine.data.augment import CpuAugmenter, _looks_complete_jpeg

    image = Image.fromarray(_smooth_image(3, size=(61, 47)))
    encoded = []
    for mode, options in (("RGB", {"subsampling": 2}), ("RGB", {"subsampling": 0}), ("L", {})):
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, "JPEG", quality=90, **options)
        encoded.append(buffer.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif)
    encoded.append(buffer.getvalue())
    for data in encoded:
        assert _looks_complete_jpeg(data)
        ours = C.decode_jpeg(data)
        assert ours is not None
        assert np.array_equal(ours.numpy(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    augmenter = CpuAugmenter(DataConfig(global_size=32, local_size=16, num_local=1), collate=None)  # type: ignore[arg-type]
    assert [v.shape for v in augmenter.from_bytes(encoded[0], seed=0)] == [(3, 32, 32)] * 2 + [(3, 16, 16)]
    with pytest.raises(OSError):
        augmenter.from_bytes(encoded[0][: len(encoded[0]) // 2], seed=0)
