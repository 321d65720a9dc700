"""`ibot eval knn` / `ibot eval linear`: frozen teacher-backbone features of a checkpoint, classified.

Datasets are labelled image folders (class sub-folders), local shards with labels, or the splits of a built-in
dataset (`builtin:patterns:train`, `builtin:patterns:val`; the default when the model was trained on `builtin:NAME`;
datasets.py). Under torchrun every rank extracts the features of a strided share of the images (features.py), so the
result equals a one-process run. The forward runs under bf16 autocast on GPU (`--precision auto`). Rank 0 prints
`k-NN top-1: 87.3%  top-5: 98.1%` and writes a JSON result. `evaluate` is the same without the command line.

`--checkpoint` also takes released weights (`ibot eval knn --checkpoint dinov2_vits14_pretrain.pth --train X --val Y`:
how good is the released model on my data before I train?): an iBOT, DINO, DINOv2, DINOv3 or timm file, a Hugging
Face folder or one of our exports (`--init-format`, auto-detected by default; features.py `read_model_source`). The
backbone is built with the file's structure and evaluated at `--img-size`, default the file's native size (518 for
DINOv2's hub files, whose position grid is 37 x 37 of 14 px; 224 for DINOv3's RoPE files); the rest of the config
(precision, data) is the defaults, or `--config` and the overrides. Such a file records no data set, so `--train`
and `--val` are required unless `--config` or an override names `data.path`. For our checkpoints the images are
resized to the run's `data.global_size` unless `--img-size` says otherwise.
"""


from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ibot_engine.config import Config, load_config, parse_overrides
from ibot_engine.config import _set as set_key
from ibot_engine.distributed import DistEnv, init_distributed, teardown
from ibot_engine.eval.datasets import default_specs
from ibot_engine.eval.features import read_model_source, released_backbone, released_model_config, teacher_backbone
from ibot_engine.eval.knn import format_knn, knn_eval
from ibot_engine.eval.linear import format_linear, linear_eval


def _eval_size(cfg: Config, img_size: int | None) -> None:
    """`--img-size` replaces data.global_size, the side the evaluation resizes images to (our backbones resample
    their position embedding to any grid)."""
    if img_size is None:
        return
    if img_size <= 0 or img_size % cfg.model.patch_size:
        raise ValueError(f"--img-size {img_size} is not a positive multiple of the patch size {cfg.model.patch_size}")
    cfg.data.global_size = img_size


def _names_data(args: argparse.Namespace) -> bool:
    """Whether the user's config or overrides say which data a released model is evaluated on."""
    return bool(args.config) or any(o.split("=", 1)[0] in ("data.path", "data.shards") for o in args.overrides)


def load_eval_model(args: argparse.Namespace, device: torch.device) -> tuple[Config, torch.nn.Module, Path, str | None]:
    """(config, backbone, directory for results, prefix of the result's file name, None for a random init) from
    --checkpoint (ours or released weights) or --random-init."""
    which = getattr(args, "which", "teacher")
    img_size = getattr(args, "img_size", None)
    if args.random_init:
        if args.checkpoint:
            raise ValueError("give either --checkpoint or --random-init, not both")
        cfg = load_config(args.config, args.overrides)
        _eval_size(cfg, img_size)
        return cfg, teacher_backbone(cfg, None, device, which), Path(cfg.run.dir), None
    if not args.checkpoint:
        raise ValueError("--checkpoint is required (or --random-init with --config)")
    source = read_model_source(args.checkpoint, getattr(args, "init_format", "auto"))
    if source.released is not None:
        if not (args.train and args.val) and not _names_data(args):
            raise ValueError(f"--train and --val are required with released weights ({source.path} records no data "
                             "set)")
        cfg = load_config(args.config, args.overrides)
        cfg.model = released_model_config(source.released, cfg.model, img_size)
        cfg.data.global_size = cfg.model.img_size
        backbone = released_backbone(source.released, cfg.model, device, which)
        return cfg, backbone, source.path.parent, f"{source.path.stem}_"
    cfg = source.cfg
    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides:  # on top of the checkpoint's own config
        for key, value in parse_overrides(args.overrides):
            set_key(cfg, key, value)
    _eval_size(cfg, img_size)
    return cfg, teacher_backbone(cfg, source.state, device, which), source.path.parent, ""


def evaluate(kind: str, cfg: Config, backbone: torch.nn.Module, env: DistEnv, out: Path, *,
             checkpoint: str | None = None, train: str | None = None, val: str | None = None,
             **options: Any) -> dict[str, Any]:
    """k-NN (`kind="knn"`) or linear probe (`"linear"`) of `backbone` on `train` / `val` (default: the built-in
    splits of the model's data); `options` go to `knn_eval` / `linear_eval`. Rank 0 writes the JSON result to `out`
    and prints the one-line summary; every rank returns the result."""
    train_spec, val_spec = default_specs(cfg, train, val)
    if kind == "knn":
        result = knn_eval(backbone, cfg, train_spec, val_spec, device=env.device, **options)
        line = format_knn(result)
    else:
        result = linear_eval(backbone, cfg, train_spec, val_spec, device=env.device, **options)
        line = format_linear(result)
    result["checkpoint"] = checkpoint
    if env.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(line)
    return result


def _eval_main(args: argparse.Namespace, kind: str) -> dict[str, Any] | None:
    owns_group = not dist.is_initialized()
    env = init_distributed()
    try:
        cfg, backbone, where, prefix = load_eval_model(args, env.device)
        options: dict[str, Any] = {"batch_size": args.batch_size, "features": args.features,
                                   "precision": args.precision, "num_workers": args.num_workers}
        if kind == "knn":
            options.update(k=args.k, temperature=args.temperature)
        else:
            options.update(epochs=args.epochs, lrs=args.lrs)
        name = f"{kind}_random_init.json" if prefix is None else f"{prefix}{kind}.json"
        out = Path(args.out) if args.out else where / name
        return evaluate(kind, cfg, backbone, env, out, checkpoint=None if prefix is None else str(args.checkpoint),
                        train=args.train, val=args.val, **options)
    finally:
        if owns_group:
            teardown()


def knn_main(args: argparse.Namespace) -> dict[str, Any] | None:
    """`ibot eval knn`; returns the result (on every rank)."""
    return _eval_main(args, "knn")


def linear_main(args: argparse.Namespace) -> dict[str, Any] | None:
    """`ibot eval linear`; returns the result (on every rank)."""
    return _eval_main(args, "linear")
