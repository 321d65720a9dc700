"""Image-folder dataset: torchvision ImageFolder layout (one sub-folder per class) or a flat folder of images.

* Class sub-folders: `root/<class>/**/<image>`; `classes` is the sorted list of sub-folders that hold at least
  one image and the label is the index in it (images directly in `root` are then ignored, as ImageFolder does).
* Flat folder: `root/<image>` with no class sub-folder holding images; labels are -1 and `classes` is empty.

Extensions .jpg .jpeg .png .bmp .webp, any case. Hidden files and folders (leading dot) are skipped. Paths are
listed once, sorted, so indices are stable across processes and runs.

A file that fails to decode does not stop training: `load(i)` logs it once per process by name and returns
the next readable image (i + 1, i + 2, ... wrapping around), with the number of files skipped, so the batch
can report it (an attribute would be invisible from dataloader worker processes).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.utils.data
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / name for name in filenames if _is_image(name)]
    return sorted(found)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under `root`, labelled by class sub-folder (or -1 in a flat folder).

    Args:
        root: the folder.

    Raises:
        ValueError: `root` is not a folder or holds no image with a known extension.

    `__getitem__(i)` returns `(PIL.Image RGB, label)`; `load(i)` also returns how many unreadable files it
    skipped to find it.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} (data.path) does not exist or is not a folder")
        self.classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = _images_under(sub)
            if images:
                self.samples += [(path, len(self.classes)) for path in images]
                self.classes.append(sub.name)
        if not self.samples:
            self.samples = [(self.root / n, -1) for n in sorted(os.listdir(self.root)) if _is_image(n)]
        if not self.samples:
            raise ValueError(
                f"image folder {str(self.root)!r} (data.path) holds no images with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)} (neither directly nor in class sub-folders)"
            )
        self._reported: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label, _ = self.load(index)
        return image, label

    def load(self, index: int) -> tuple[Image.Image, int, int]:
        """Image `index` as RGB, its label and the number of unreadable files skipped to find a readable one.

        Raises:
            RuntimeError: no file of the dataset can be read.
        """
        for skipped in range(len(self.samples)):
            path, label = self.samples[(index + skipped) % len(self.samples)]
            try:
                with Image.open(path) as opened:
                    return opened.convert("RGB"), label, skipped
            # Decoders raise OSError, ValueError, SyntaxError, DecompressionBombError, struct.error, ...
            # depending on the format and the damage; any of them means "skip this file".
            except Exception as err:
                if path not in self._reported:
                    self._reported.add(path)
                    logger.warning("skipping unreadable image %s: %s", path, err)
        raise RuntimeError(f"no image under {str(self.root)!r} (data.path) could be read")
