"""The labelled datasets evaluation reads: image folders, local WebDataset shards with labels, built-in splits.

`build_eval_dataset(spec, cfg)` turns a spec into a dataset of `(PIL image, label)`; `default_specs` picks the
built-in train / val splits for a model trained on built-in data.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
import torch.utils.data
from PIL import Image

from ibot_engine.config import Config
from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.shards.resolve import IMAGE_KEYS, index_local_shard, read_member, resolve_shards
from ibot_engine.data.synthetic import builtin_dataset

log = logging.getLogger(__name__)


class ShardEvalDataset(torch.utils.data.Dataset):
    """`(PIL image, label)` of local WebDataset shards with labels (`ibot shards write` of a class-folder tree), by
    index in shard order, so the ranks can split them like a folder.

    The tar headers are scanned once (`index_local_shard`: labels read, image members located); `__getitem__` reads
    one member by offset. An unreadable image is logged once and replaced by the next readable one, as in
    `ImageFolderDataset`.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.items: list[tuple[str, int, int, int]] = []  # (tar path, data offset, size, label)
        for url in resolve_shards(spec).urls:
            path = url.removeprefix("file:")
            if not Path(path).is_file():
                raise ValueError(f"evaluation reads local shard files only: {url!r} (in {spec!r}) is not one")
            for key, members in index_local_shard(path):
                image = next((members[k] for k in IMAGE_KEYS if k in members), None)
                if image is None or "cls" not in members:
                    raise ValueError(f"evaluation needs labelled images: sample {key!r} of shard {url!r} has "
                                     f"no {'image' if image is None else '.cls label'}")
                label = int(read_member(path, *members["cls"]).decode())
                self.items.append((path, *image, label))
        if not self.items:
            raise ValueError(f"shards {spec!r} hold no samples")
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for step in range(len(self.items)):
            i = (index + step) % len(self.items)
            path, offset, size, label = self.items[i]
            try:
                with Image.open(io.BytesIO(read_member(path, offset, size))) as opened:
                    return opened.convert("RGB"), label
            except Exception as err:  # any decoder error means "skip this image"
                if i not in self._reported:
                    self._reported.add(i)
                    log.warning("skipping unreadable image %d of shards %s: %s", i, self.spec, err)
        raise RuntimeError(f"no image of shards {self.spec!r} could be read")


def _is_shards(spec: str) -> bool:
    path = Path(spec)
    if path.is_dir():
        return (path / "manifest.json").is_file() or (
            any(path.glob("*.tar")) and not any(p.is_dir() for p in path.iterdir()))
    return ".tar" in spec


def build_eval_dataset(spec: str, cfg: Config) -> torch.utils.data.Dataset:
    """`builtin:NAME:train|val` (size from data.builtin_size; val a quarter of it), local WebDataset shards with
    labels (a folder with manifest.json or *.tar, or a brace pattern), or a labelled image folder."""
    if spec.startswith("builtin:"):
        val = spec.endswith(":val")
        return builtin_dataset(spec, max(cfg.data.builtin_size // 4, 100) if val else cfg.data.builtin_size)
    if _is_shards(spec):
        return ShardEvalDataset(spec)
    dataset = ImageFolderDataset(spec)
    if not dataset.classes:
        raise ValueError(f"evaluation needs labels: {spec!r} has no class sub-folders")
    return dataset


def default_specs(cfg: Config, train_spec: str | None, val_spec: str | None) -> tuple[str, str]:
    """The given datasets, or the train / val splits of the built-in dataset the model was trained on."""
    if train_spec and val_spec:
        return train_spec, val_spec
    if cfg.data.shards.strip() or not cfg.data.path.startswith("builtin:"):
        raise ValueError("--train and --val (labelled image folders or shards) are required for a model not "
                         "trained on a built-in dataset")
    name = ":".join(cfg.data.path.split(":")[:2])
    return train_spec or f"{name}:train", val_spec or f"{name}:val"
