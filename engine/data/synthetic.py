"""Built-in labelled datasets (`data.path=builtin:NAME`): the generated `shapes` and `patterns` (the default
`data.path`, for quick runs and tests), and `builtin_dataset`, which also opens the real scans of `digits`
(digits.py; the demo's data).

Nothing generated is downloaded or stored: image `i` of a split is rendered on the fly from a generator seeded with
`(seed, split, i)`, so every process and every run sees the same pixels.

`shapes`: the class is the shape (circle, ring, square, frame, triangle, star, cross, crescent, striped disc, checkered
square). Everything else is random per image: foreground and background colours (a pair from a small palette
with enough luma contrast to survive grayscale), position, size, rotation, a faint gradient and pixel noise.
Colour dominates a random-init ViT's cls token, so k-NN of random features is near chance; the palette is small
so that colour cannot identify an image either, and iBOT's view-invariance objective has to encode the shape:
k-NN accuracy on this data separates a random-init backbone from a pretrained one within minutes of CPU training.
"""

from __future__ import annotations

import math

import numpy as np
import torch.utils.data
from PIL import Image

from ibot_engine.data.digits import digits_folder
from ibot_engine.data.folder import ImageFolderDataset

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


# A small palette, shared by all classes: colour says nothing about the class, and with few colours it cannot tell
# two images apart either, so view-invariant self-supervision has to look at the shape. (With per-image random
# colours or textures, matching the colours of two views solves the pretext task and no shape is learned.)
PALETTE = np.array(
    [
        [0.90, 0.10, 0.10], [0.10, 0.60, 0.15], [0.15, 0.25, 0.85], [0.95, 0.85, 0.10],
        [0.95, 0.95, 0.95], [0.08, 0.08, 0.08], [0.60, 0.15, 0.75], [0.10, 0.75, 0.80],
    ],
    dtype=np.float32,
)


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


# (foreground, background) palette pairs whose luma differs enough for the shape to survive grayscale.
_PAIRS = [(f, b) for f in range(len(PALETTE)) for b in range(len(PALETTE))
          if f != b and abs(_luma(PALETTE[f]) - _luma(PALETTE[b])) > 0.15]


class _GeneratedDataset(torch.utils.data.Dataset):
    """`size` images of `image_size` pixels rendered on the fly; label = index % number of classes (balanced).

    Args:
        size: number of images.
        seed: base seed; with `split` and the index it fixes every pixel of an image.
        image_size: side of the square RGB images in pixels.
        split: "train" or "val"; the two draw from disjoint random streams.

    `__getitem__(i)` returns `(PIL.Image RGB, int label)`.
    """

    classes: list[str]
    _stream: tuple[int, ...] = ()  # appended to the seed key so that two datasets never share a random stream

    def __init__(self, size: int = 2000, seed: int = 0, image_size: int = 64, split: str = "train") -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if size < 1 or image_size < 8:
            raise ValueError(f"need size >= 1 and image_size >= 8, got {size} and {image_size}")
        self.size, self.seed, self.image_size, self.split = size, seed, image_size, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % len(self.classes)
        rng = np.random.default_rng((self.seed, _SPLITS[self.split], index, *self._stream))
        return self._render(label, rng), label

    def _render(self, label: int, rng: np.random.Generator) -> Image.Image:
        raise NotImplementedError


class ShapesDataset(_GeneratedDataset):
    """Synthetic shape classification: label = shape class (see the module docstring)."""

    classes: list[str] = CLASSES

    def __init__(self, size: int = 2000, seed: int = 0, image_size: int = 64, split: str = "train") -> None:
        super().__init__(size, seed, image_size, split)
        n = image_size * _SUPERSAMPLE
        # Pixel centres in [-1, 1], shared by every image (the per-image affine is applied to these).
        axis = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
        self._y, self._x = np.meshgrid(axis, axis, indexing="ij")

    def _render(self, label: int, rng: np.random.Generator) -> Image.Image:
        fg_index, bg_index = _PAIRS[rng.integers(len(_PAIRS))]
        fg = PALETTE[fg_index]
        background = self._background(PALETTE[bg_index], rng)

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
        image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.04))
        return Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")

    def _background(self, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[s, s, 3] in [0, 1]: a palette colour with a faint random linear gradient."""
        s = self.image_size
        axis = np.linspace(-1, 1, s, dtype=np.float32)
        gx, gy = rng.uniform(-0.08, 0.08, size=2)
        gradient = (axis[None, :] * gx + axis[:, None] * gy)[..., None]
        return np.clip(base[None, None, :] + gradient, 0, 1)


PATTERN_CLASSES = ["hstripes", "vstripes", "checker", "dots", "rings", "plaid", "crosshatch", "flat"]


class PatternsDataset(_GeneratedDataset):
    """Synthetic pattern classification (the default `data.path`, for quick runs and tests): label = the pattern's
    structure.

    Classes: horizontal / vertical stripes, checker, dots, rings, plaid, crosshatch, flat. Every class is unchanged
    by a horizontal flip and by rescaling within the crop scales, so the label survives iBOT's augmentations; the
    period (7-14 px at 64 px), phase and a smooth random colour field are random per image. Because the colour
    differs between two crops of one image, matching colours cannot solve iBOT's view-matching task, and the
    structure, which a ViT-tiny picks up within minutes on a CPU (shapes need far longer), has to be learned.

    Args and `__getitem__` as `ShapesDataset`.
    """

    classes: list[str] = PATTERN_CLASSES
    _stream = (1,)

    def __init__(self, size: int = 2000, seed: int = 0, image_size: int = 64, split: str = "train") -> None:
        super().__init__(size, seed, image_size, split)
        axis = np.arange(image_size, dtype=np.float32)
        self._y, self._x = np.meshgrid(axis, axis, indexing="ij")

    def _render(self, label: int, rng: np.random.Generator) -> Image.Image:
        period = rng.uniform(7.0, 14.0) * self.image_size / 64
        phase_x, phase_y = rng.uniform(0.0, period, size=2)
        x, y = (self._x + phase_x) / period, (self._y + phase_y) / period
        name = self.classes[label]
        if name == "hstripes":
            mask = y % 1 < 0.5
        elif name == "vstripes":
            mask = x % 1 < 0.5
        elif name == "checker":
            mask = (x % 1 < 0.5) ^ (y % 1 < 0.5)
        elif name == "dots":
            mask = (x % 1 - 0.5) ** 2 + (y % 1 - 0.5) ** 2 < 0.09
        elif name == "rings":
            cx, cy = rng.uniform(0, self.image_size, size=2)
            mask = np.hypot(self._x - cx, self._y - cy) / period % 1 < 0.5
        elif name == "plaid":
            mask = (x % 1 < 0.25) | (y % 1 < 0.25)
        elif name == "crosshatch":
            mask = ((x + y) % 1 < 0.25) | ((x - y) % 1 < 0.25)
        else:  # flat
            mask = np.zeros_like(x, dtype=bool)
        # Colour: a smooth random field over the image (a 3 x 3 grid of random colours, upsampled), drawn dark on
        # the pattern and light elsewhere. Two crops of one image see different colours, so colour cannot solve
        # the view-matching task: the pretext task needs the structure.
        grid = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
        size = (self.image_size, self.image_size)
        field = np.asarray(Image.fromarray(grid, "RGB").resize(size, Image.BICUBIC), np.float32) / 255
        image = np.where(mask[..., None], 0.3 * field, 0.4 + 0.6 * field)
        image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(0.04)
        return Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


BUILTIN_DATASETS = {"shapes": ShapesDataset, "patterns": PatternsDataset}
# Real images written once to an image folder (engine/data/digits.py); read like any user's folder.
BUILTIN_FOLDERS = ("digits",)


def _parse_builtin(spec: str, split: str) -> tuple[str, str]:
    parts = spec.split(":")
    names = sorted([*BUILTIN_DATASETS, *BUILTIN_FOLDERS])
    if len(parts) not in (2, 3) or parts[0] != "builtin" or parts[1] not in names:
        raise ValueError(f"unknown built-in dataset {spec!r}; use builtin:NAME[:train|val] with NAME in {names}")
    split = parts[2] if len(parts) == 3 else split
    if split not in _SPLITS:
        raise ValueError(f"unknown split in {spec!r}; use train or val")
    return parts[1], split


def builtin_folder(spec: str, split: str = "train") -> str | None:
    """The image folder behind `builtin:NAME[:SPLIT]` for the folder-backed built-ins (digits), else None."""
    name, split = _parse_builtin(spec, split)
    if name not in BUILTIN_FOLDERS:
        return None
    return str(digits_folder(split))


def builtin_dataset(spec: str, size: int, split: str = "train") -> torch.utils.data.Dataset:
    """`builtin:NAME` or `builtin:NAME:SPLIT` (NAME in digits, patterns, shapes; SPLIT in train, val).

    `size` is the number of generated images (patterns, shapes); the digits have their fixed 1,437 / 360."""
    name, split = _parse_builtin(spec, split)
    if name in BUILTIN_FOLDERS:
        return ImageFolderDataset(digits_folder(split))
    return BUILTIN_DATASETS[name](size=size, seed=0, split=split)
