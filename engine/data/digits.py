"""`builtin:digits`: scikit-learn's handwritten digits as a real-image folder, for demos and learning tests.

The 1,797 scans of handwritten digits that ship inside scikit-learn (UCI "Optical Recognition of Handwritten
Digits": 8 x 8 pixels, 17 grey levels) are written once, upscaled bicubically to 64 x 64 RGB PNGs, into an image
folder with one sub-folder per class, and split 80 / 20 into `train` (1,437 images) and `val` (360) with a fixed
permutation. Training and evaluation then read them through the same `ImageFolderDataset` (or, after
`ibot shards write builtin:digits:train DIR`, the same shard reader) as any user's data: nothing about the data
path is special-cased, only where the folder comes from.

The folder lives under `$IBOT_CACHE` (default `~/.cache/ibot-engine`) in `digits-v1/`; it is built in a temporary
sibling and renamed into place, so concurrent ranks or a killed build never leave a half-written dataset behind.
Needs scikit-learn (`pip install 'ibot-engine[digits]'`); nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val")
IMAGE_SIZE = 64
TRAIN_FRACTION = 0.8
_VERSION = "digits-v1"  # bump when the rendering or the split changes: a new folder, never a stale one


def cache_root() -> Path:
    return Path(os.environ.get("IBOT_CACHE") or Path.home() / ".cache" / "ibot-engine")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ValueError(
            "data.path=builtin:digits needs scikit-learn (its bundled scans are the images): "
            "pip install 'ibot-engine[digits]'"
        ) from err
    digits = load_digits()
    return digits.images, digits.target


def _write(root: Path) -> None:
    images, labels = _load_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    n_train = int(TRAIN_FRACTION * len(order))
    for split, indices in (("train", order[:n_train]), ("val", order[n_train:])):
        for i in indices:
            folder = root / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray((images[i] / 16.0 * 255).astype(np.uint8), "L")
            grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).convert("RGB").save(folder / f"{int(i):04d}.png")


def digits_folder(split: str = "train") -> Path:
    """The image folder of `split` (train or val), written on first use."""
    if split not in SPLITS:
        raise ValueError(f"builtin:digits has splits {list(SPLITS)}, not {split!r}")
    root = cache_root() / _VERSION
    if not (root / "complete").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_VERSION}-", dir=root.parent))
        try:
            _write(tmp)
            (tmp / "complete").write_text("1797 images: scikit-learn load_digits, 64 px RGB, 80/20 split (seed 0)\n")
            try:
                tmp.rename(root)
            except OSError:  # another process finished first: its folder is the same data
                if not (root / "complete").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / split
