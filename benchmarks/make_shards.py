"""Realistic JPEG shards for the data benchmark: ImageNet-like photographs, so that decode cost is honest.

Source photographs: the colour photographs that scikit-image ships in `skimage/data` (astronaut, chelsea the cat,
coffee, Hubble deep field, the two motorcycle stereo views, retina, rocket, the IHC micrograph; public domain or
CC0, see skimage/data/README.txt). Install with `pip install -e .[bench]` (scikit-image is in the bench extra). Only
the package's data folder is read (located without importing scikit-image, so its own dependencies are not needed).

Each image is a random crop (25-100% of the photograph's area, aspect 4:3 or 3:4 with a little jitter) of a random
photograph, resized to about 500 x 375 (ImageNet's median size) with bicubic filtering, randomly flipped and
slightly re-coloured, saved as JPEG quality 90 (~60-110 KB, like ImageNet's). The images are written to a folder
and turned into shards by the engine's own writer (`ibot_engine.data.shards.write_shards`), as users would.

    python -m ibot_benchmarks.make_shards OUT [--images 2000] [--max-count 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from ibot_engine.data.shards.write import write_shards

PHOTOGRAPHS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg", "ihc.png",
)


def photograph_folder() -> Path:
    """scikit-image's bundled data folder (without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image is not installed: pip install -e .[bench] (or pip install scikit-image)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in PHOTOGRAPHS if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"scikit-image's data folder {folder} lacks {missing}")
    return folder


def realistic_image(photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    portrait = rng.random() < 0.25
    out_size = (375, 500) if portrait else (500, 375)
    aspect = out_size[0] / out_size[1] * float(np.exp(rng.uniform(-0.1, 0.1)))
    w, h = photo.size
    area = w * h * rng.uniform(0.25, 1.0)
    cw = min(w, round(float(np.sqrt(area * aspect))))
    ch = min(h, round(cw / aspect))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = photo.crop((left, top, left + cw, top + ch)).resize(out_size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.85, 1.15))


def make_shards(out: str | Path, images: int = 2000, max_count: int = 500, seed: int = 0, workers: int = 0) -> dict:
    """Write `images` realistic JPEGs as shards + manifest under `out`; returns the manifest."""
    folder = photograph_folder()
    photos = [Image.open(folder / name).convert("RGB") for name in PHOTOGRAPHS]
    rng = np.random.default_rng(seed)
    staging = Path(tempfile.mkdtemp(prefix="ibot-bench-images-"))
    try:
        for i in range(images):
            realistic_image(photos, rng).save(staging / f"{i:07d}.jpg", "JPEG", quality=90)
        manifest = write_shards(staging, out, max_count=max_count, workers=workers, progress=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sizes = [s["count"] for s in manifest["shards"]]
    print(f"{manifest['total']} images ({', '.join(PHOTOGRAPHS)}) in {len(sizes)} shards under {out}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--max-count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    make_shards(args.out, args.images, args.max_count, args.seed, args.workers)


if __name__ == "__main__":
    main()
