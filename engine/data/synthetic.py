"""Built-in labelled dataset for the demo: shapes whose class is their geometry, on nuisance backgrounds.

Nothing is downloaded or stored: image `i` of a split is rendered on the fly from a generator seeded with
`(seed, split, i)`, so every process and every run sees the same pixels.

The class is the shape (circle, ring, square, frame, triangle, star, cross, crescent, striped disc, checkered
square). Everything else is random per image: foreground and background colours, position, size, rotation,
a smooth background texture and pixel noise. These nuisances are what a random-init ViT's features mostly
encode (mean colour dominates the cls token), while iBOT's augmentations (colour jitter, grayscale, crops,
flips, blur, solarize) push a pretrained network to ignore them, so k-NN accuracy on this data separates a
random-init backbone from a pretrained one within minutes of CPU training.
"""

from __future__ import annotations

import math

import numpy as np
import torch.utils.data
from PIL import Image

CLASSES = [
    "circle",
    "ring",
    "square",
    "frame",
    "triangle",
    "star",
    "cross",
    "crescent",
    "stripes",
    "checker",
]

_SPLITS = {"train": 0, "val": 1}
# Render at 2x and average 2x2 blocks: cheap anti-aliasing, so edges do not turn into a class-specific
# staircase texture that a network could key on instead of the shape.
_SUPERSAMPLE = 2


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of shape `name` in canonical coordinates (unit radius, centred at 0)."""
    r = np.sqrt(u * u + v * v)  # np.hypot is ~5x slower and the extra range is not needed here
    au, av = np.abs(u), np.abs(v)
    if name == "circle":
        return r < 1.0
    if name == "ring":
        return (r < 1.0) & (r > rng.uniform(0.45, 0.65))
    if name == "square":
        return np.maximum(au, av) < 0.8
    if name == "frame":
        m = np.maximum(au, av)
        return (m < 0.85) & (m > rng.uniform(0.45, 0.6))
    if name == "triangle":
        # Equilateral triangle inscribed in the unit circle: three half-planes at 120 degrees.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3
            inside &= u * math.cos(a) + v * math.sin(a) > -0.5
        return inside
    if name == "star":
        theta = np.arctan2(v, u)
        # Radius oscillates between inner and outer radius five times around the centre.
        inner = rng.uniform(0.35, 0.5)
        tri = np.abs(((theta * 5 / (2 * math.pi)) % 1.0) * 2 - 1)  # 1 at the tips, 0 between
        return r < inner + (1.0 - inner) * tri
    if name == "cross":
        w = rng.uniform(0.25, 0.35)
        return ((au < w) & (av < 0.95)) | ((av < w) & (au < 0.95))
    if name == "crescent":
        shift = rng.uniform(0.35, 0.55)
        return (r < 1.0) & (np.sqrt((u - shift) ** 2 + v * v) > 0.8)
    if name == "stripes":
        period = rng.uniform(0.45, 0.65)
        return (r < 1.0) & ((u / period) % 1.0 < 0.5)
    if name == "checker":
        # 3x3 or 4x4 cells aligned with the square's edges, so no slivers of cells are left at the border.
        period = 1.6 / rng.integers(3, 5)
        cells = np.floor((u + 0.8) / period) + np.floor((v + 0.8) / period)
        return (np.maximum(au, av) < 0.8) & (cells % 2 == 0)
    raise AssertionError(name)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


class ShapesDataset(torch.utils.data.Dataset):
    """Synthetic shape classification: `size` images of `image_size` pixels, label = shape class.

    Args:
        size: number of images; labels cycle through the classes, so they are balanced.
        seed: base seed; with `split` and the index it fixes every pixel of an image.
        image_size: side of the square RGB images in pixels.
        split: "train" or "val"; the two draw from disjoint random streams.

    `__getitem__(i)` returns `(PIL.Image RGB, int label)`.
    """

    classes: list[str] = CLASSES

    def __init__(self, size: int = 2000, seed: int = 0, image_size: int = 64, split: str = "train") -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if size < 1 or image_size < 8:
            raise ValueError(f"need size >= 1 and image_size >= 8, got {size} and {image_size}")
        self.size = size
        self.seed = seed
        self.image_size = image_size
        self.split = split
        n = image_size * _SUPERSAMPLE
        # Pixel centres in [-1, 1], shared by every image (the per-image affine is applied to these).
        axis = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
        self._y, self._x = np.meshgrid(axis, axis, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % len(self.classes)
        rng = np.random.default_rng((self.seed, _SPLITS[self.split], index))
        return self._render(label, rng), label

    def _render(self, label: int, rng: np.random.Generator) -> Image.Image:
        background = self._background(rng)

        # Foreground colour with a minimum luma contrast, so the shape survives grayscale augmentation.
        bg_mean = background[::4, ::4].reshape(-1, 3).mean(0)
        fg = _random_colour(rng)
        for _ in range(10):
            if abs(_luma(fg) - _luma(bg_mean)) > 0.25:
                break
            fg = _random_colour(rng)

        # Inverse similarity transform: image coordinates -> canonical shape coordinates.
        radius = rng.uniform(0.45, 0.8)  # in units of half the image side
        cx, cy = rng.uniform(-1 + 0.6 * radius, 1 - 0.6 * radius, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = self._x - cx, self._y - cy
        u = (cos * dx + sin * dy) * np.float32(1 / radius)
        v = (cos * dy - sin * dx) * np.float32(1 / radius)
        mask = _shape_mask(self.classes[label], u, v, rng)
        # PIL's box reduce averages the 2x2 blocks several times faster than a numpy mean over axes.
        alpha = Image.fromarray(mask.view(np.uint8) * np.uint8(255)).reduce(_SUPERSAMPLE)
        alpha = np.asarray(alpha, np.float32)[..., None] * np.float32(1 / 255)

        image = background + (fg.astype(np.float32) - background) * alpha
        image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.06))
        return Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """[s, s, 3] in [0, 1]: a random colour, a linear gradient and smooth low-frequency blotches."""
        s = self.image_size
        base = _random_colour(rng)
        # Blotches: a coarse random grid upsampled bicubically by PIL (about 20 us at 64 px).
        grid = rng.integers(0, 256, size=(rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.uint8)
        blotches = np.asarray(Image.fromarray(grid, "RGB").resize((s, s), Image.BICUBIC), np.float32) / 255 - 0.5
        axis = np.linspace(-1, 1, s, dtype=np.float32)
        gx, gy = rng.uniform(-0.2, 0.2, size=2)
        gradient = (axis[None, :] * gx + axis[:, None] * gy)[..., None]
        background = base.astype(np.float32) + np.float32(rng.uniform(0.1, 0.4)) * blotches + gradient
        return np.clip(background, 0, 1)
