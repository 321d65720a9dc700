"""`ibot eval knn` / `ibot eval linear`: frozen teacher-backbone features of a checkpoint, classified.

Datasets are labelled image folders (class sub-folders) or the splits of a built-in dataset
(`builtin:patterns:train`, `builtin:patterns:val`; the default when the model was trained on `builtin:NAME`).
Under torchrun every rank extracts the features of a strided share of the images (rank r: images r, r + W, ...);
the shares are all-gathered back into dataset order, so the result equals a one-process run. The forward runs
under bf16 autocast on GPU (`--precision auto`). Rank 0 prints `k-NN top-1: 87.3%  top-5: 98.1%` and writes a JSON
result. `KnnEvaluator` is the same k-NN inside training (`eval.knn_every`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from engine.checkpoint import resolve_checkpoint_path
from engine.config import Config, load_config, parse_overrides
from engine.config import _set as set_key
from engine.data.folder import ImageFolderDataset
from engine.distributed import DistEnv, init_distributed, teardown
from engine.knn import extract_features, format_knn, weighted_knn
from engine.model.ibot import IBOT
from engine.train import autocast_dtype

log = logging.getLogger(__name__)


class ShardEvalDataset(torch.utils.data.Dataset):
    """`(PIL image, label)` of local WebDataset shards with labels (`ibot shards write` of a class-folder tree), by
    index in shard order, so the ranks can split them like a folder.

    The tar headers are scanned once (labels read, image members located); `__getitem__` reads one member by offset.
    An unreadable image is logged once and replaced by the next readable one, as in `ImageFolderDataset`.
    """

    def __init__(self, spec: str) -> None:
        from engine.data.shards import IMAGE_KEYS, resolve_shards

        self.spec = spec
        self.items: list[tuple[str, int, int, int]] = []  # (tar path, data offset, size, label)
        for url in resolve_shards(spec).urls:
            path = url.removeprefix("file:")
            if not Path(path).is_file():
                raise ValueError(f"evaluation reads local shard files only: {url!r} (in {spec!r}) is not one")
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    folder, _, name = info.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if info.isreg() and dot and not name.startswith("__"):
                        samples.setdefault(f"{folder}/{stem}", {})[ext.lower()] = info
                for key, members in samples.items():
                    image = next((members[k] for k in IMAGE_KEYS if k in members), None)
                    if image is None or "cls" not in members:
                        raise ValueError(f"evaluation needs labelled images: sample {key!r} of shard {url!r} has "
                                         f"no {'image' if image is None else '.cls label'}")
                    label = int(tar.extractfile(members["cls"]).read().decode())  # type: ignore[union-attr]
                    self.items.append((path, image.offset_data, image.size, label))
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
                with open(path, "rb") as f:
                    f.seek(offset)
                    with Image.open(io.BytesIO(f.read(size))) as opened:
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
        from engine.data.synthetic import builtin_dataset

        val = spec.endswith(":val")
        return builtin_dataset(spec, max(cfg.data.builtin_size // 4, 100) if val else cfg.data.builtin_size)
    if _is_shards(spec):
        return ShardEvalDataset(spec)
    dataset = ImageFolderDataset(spec)
    if not dataset.classes:
        raise ValueError(f"evaluation needs labels: {spec!r} has no class sub-folders")
    return dataset


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint (sharded directory or .pt file), or the latest one of a run directory."""
    try:
        return resolve_checkpoint_path(path)
    except ValueError:
        raise ValueError(f"--checkpoint {path!r}: not a checkpoint or a run directory with checkpoints") from None


def teacher_backbone(cfg: Config, state: dict[str, Any] | None, device: torch.device,
                     which: str = "teacher") -> torch.nn.Module:
    """The teacher (or student) backbone of a checkpoint's model state, or of a fresh model (seeded by
    train.seed)."""
    torch.manual_seed(cfg.train.seed)
    model = IBOT(cfg.model, cfg.loss)
    if state is not None:
        model.load_state_dict(state)
    return getattr(model, which).backbone.to(device).eval()


def default_specs(cfg: Config, train_spec: str | None, val_spec: str | None) -> tuple[str, str]:
    """The given datasets, or the train / val splits of the built-in dataset the model was trained on."""
    if train_spec and val_spec:
        return train_spec, val_spec
    if cfg.data.shards.strip() or not cfg.data.path.startswith("builtin:"):
        raise ValueError("--train and --val (labelled image folders or shards) are required for a model not "
                         "trained on a built-in dataset")
    name = ":".join(cfg.data.path.split(":")[:2])
    return train_spec or f"{name}:train", val_spec or f"{name}:val"


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_in_order(local: Tensor, total: int, device: torch.device) -> Tensor:
    """Rows of rank r are items r, r + W, r + 2W, ... of `total`; returns all `total` rows in item order."""
    world = _world()[1]
    if world == 1:
        return local
    per_rank = math.ceil(total / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    padded = padded.to(device)  # NCCL gathers device tensors; gloo CPU ones
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    # stack -> [per_rank, W, ...]: row j of rank r is item j * W + r; the padding lands past `total`.
    return torch.stack(shards, dim=1).flatten(0, 1)[:total].cpu()


def dataset_features(backbone: torch.nn.Module, dataset: torch.utils.data.Dataset, *, image_size: int,
                     batch_size: int, device: torch.device, amp: torch.dtype | None, features: str = "cls",
                     normalize: bool = True, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """`extract_features` of the whole dataset, split over the ranks of the process group (if any)."""
    rank, world = _world()
    total = len(dataset)  # type: ignore[arg-type]
    if total < world:
        raise ValueError(f"{total} images cannot be split over {world} ranks")
    # Every rank embeds the same number of images (the last one repeated where the split is uneven, then dropped),
    # so every rank runs the same forwards: an FSDP-sharded teacher gathers its parameters in each of them.
    per_rank, own = math.ceil(total / world), len(range(rank, total, world))
    shard = dataset if world == 1 else torch.utils.data.Subset(
        dataset, [min(i, total - 1) for i in range(rank, per_rank * world, world)])
    feats, labels = extract_features(backbone, shard, image_size=image_size, batch_size=batch_size, device=device,
                                     autocast_dtype=amp, features=features, normalize=normalize,
                                     num_workers=num_workers)
    feats, labels = feats[:own], labels[:own]
    return gather_in_order(feats, total, device), gather_in_order(labels, total, device)


def knn_eval(backbone: torch.nn.Module, cfg: Config, train_spec: str, val_spec: str, *, k: int = 20,
             temperature: float = 0.07, batch_size: int = 128, device: torch.device | None = None,
             features: str = "cls", precision: str | None = None, num_workers: int = 0) -> dict[str, Any]:
    """k-NN of `backbone` features: `train_spec` is the memory, `val_spec` is classified. `precision` defaults to
    the config's."""
    device = device or next(backbone.parameters()).device
    amp = autocast_dtype(precision or cfg.precision, device)
    feats = {}
    for name, spec in (("train", train_spec), ("val", val_spec)):
        feats[name] = dataset_features(backbone, build_eval_dataset(spec, cfg), image_size=cfg.data.global_size,
                                       batch_size=batch_size, device=device, amp=amp, features=features,
                                       num_workers=num_workers)
    (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
    # The similarity matmuls run where the model does (GPU for ImageNet-sized sets), chunked over val rows.
    result = weighted_knn(train_x.to(device), train_y, val_x, val_y, k=k, temperature=temperature)
    return {**result, "k": k, "temperature": temperature, "features": features, "train": train_spec,
            "val": val_spec, "num_train": len(feats["train"][1]), "num_val": len(feats["val"][1])}


@contextlib.contextmanager
def _unsharded_root(network: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2 the teacher network is the root unit and owns the backbone's embeddings and final norm (each block
    is its own unit and gathers itself in its forward): gather the root's parameters around a backbone-only pass."""
    unshard = getattr(network, "unshard", None)  # FSDPModule
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        network.reshard()


class KnnEvaluator:
    """k-NN of the teacher during training (`eval.knn_every`): datasets built once, at the start of the run, so a
    bad `eval.train` / `eval.val` fails before the first step."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        train_spec, val_spec = default_specs(cfg, cfg.eval.train or None, cfg.eval.val or None)
        self.datasets = {"train": build_eval_dataset(train_spec, cfg), "val": build_eval_dataset(val_spec, cfg)}

    def __call__(self, teacher: torch.nn.Module, env: DistEnv) -> dict[str, float]:
        """`{"knn_top1": %, "knn_top5": %}` of the teacher's backbone; every rank takes part (collectives) and gets
        the result."""
        with _unsharded_root(teacher):
            return self._knn(teacher.backbone, env)

    def _knn(self, backbone: torch.nn.Module, env: DistEnv) -> dict[str, float]:
        c = self.cfg.eval
        amp = autocast_dtype(self.cfg.precision, env.device)
        # The DataLoader draws its base seed from the global RNG: keep training's RNG stream as it was.
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            train, val = (dataset_features(backbone, self.datasets[s], image_size=self.cfg.data.global_size,
                                           batch_size=c.batch_size, device=env.device, amp=amp,
                                           features=c.features, num_workers=c.num_workers)
                          for s in ("train", "val"))
            result = weighted_knn(train[0].to(env.device), train[1], *val, k=c.k, temperature=c.temperature)
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}


def load_eval_model(args: argparse.Namespace, device: torch.device) -> tuple[Config, torch.nn.Module, Path, bool]:
    """(config, backbone, directory for results, from a checkpoint?) from --checkpoint or --random-init."""
    which = getattr(args, "which", "teacher")
    if args.random_init:
        if args.checkpoint:
            raise ValueError("give either --checkpoint or --random-init, not both")
        cfg = load_config(args.config, args.overrides)
        return cfg, teacher_backbone(cfg, None, device, which), Path(cfg.run.dir), False
    if not args.checkpoint:
        raise ValueError("--checkpoint is required (or --random-init with --config)")
    from engine.export import read_checkpoint

    state, cfg, path = read_checkpoint(args.checkpoint)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides:  # on top of the checkpoint's own config
        for key, value in parse_overrides(args.overrides):
            set_key(cfg, key, value)
    return cfg, teacher_backbone(cfg, state, device, which), path.parent, True


def _eval_main(args: argparse.Namespace, kind: str) -> dict[str, Any] | None:
    owns_group = not dist.is_initialized()
    env = init_distributed()
    try:
        cfg, backbone, where, trained = load_eval_model(args, env.device)
        train_spec, val_spec = default_specs(cfg, args.train, args.val)
        precision = args.precision
        if kind == "knn":
            result = knn_eval(backbone, cfg, train_spec, val_spec, k=args.k, temperature=args.temperature,
                              batch_size=args.batch_size, device=env.device, features=args.features,
                              precision=precision, num_workers=args.num_workers)
            line = format_knn(result)
        else:
            from engine.linear import format_linear, linear_eval

            result = linear_eval(backbone, cfg, train_spec, val_spec, batch_size=args.batch_size, device=env.device,
                                 features=args.features, precision=precision, epochs=args.epochs, lrs=args.lrs,
                                 num_workers=args.num_workers)
            line = format_linear(result)
        result["checkpoint"] = str(args.checkpoint) if trained else None
        if not env.is_main:
            return result
        name = f"{kind}.json" if trained else f"{kind}_random_init.json"
        out = Path(args.out) if args.out else where / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(line)
        return result
    finally:
        if owns_group:
            teardown()


def knn_main(args: argparse.Namespace) -> dict[str, Any] | None:
    """`ibot eval knn`; returns the result (on every rank)."""
    return _eval_main(args, "knn")


def linear_main(args: argparse.Namespace) -> dict[str, Any] | None:
    """`ibot eval linear`; returns the result (on every rank)."""
    return _eval_main(args, "linear")
