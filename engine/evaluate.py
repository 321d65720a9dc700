"""`ibot eval knn`: weighted k-NN (DINO protocol) on the teacher backbone's cls features of a checkpoint.

Datasets are labelled image folders (class sub-folders) or the splits of a built-in dataset
(`builtin:patterns:train`, `builtin:patterns:val`; the default when the model was trained on `builtin:NAME`).
Prints `k-NN top-1: 87.3%  top-5: 98.1%` and writes a JSON result.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_consolidated, resolve_checkpoint_path
from engine.config import Config, config_from_dict, load_config
from engine.data.folder import ImageFolderDataset
from engine.knn import extract_features, format_knn, weighted_knn
from engine.model.ibot import IBOT
from engine.train import autocast_dtype

log = logging.getLogger(__name__)


def build_eval_dataset(spec: str, cfg: Config) -> torch.utils.data.Dataset:
    """`builtin:NAME:train|val` (size from data.builtin_size; val a quarter of it) or a labelled image folder."""
    if spec.startswith("builtin:"):
        from engine.data.synthetic import builtin_dataset

        val = spec.endswith(":val")
        return builtin_dataset(spec, max(cfg.data.builtin_size // 4, 100) if val else cfg.data.builtin_size)
    dataset = ImageFolderDataset(spec)
    if not dataset.classes:
        raise ValueError(f"k-NN needs labels: {spec!r} has no class sub-folders")
    return dataset


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint (sharded directory or .pt file), or the latest one of a run directory."""
    try:
        return resolve_checkpoint_path(path)
    except ValueError:
        raise ValueError(f"--checkpoint {path!r}: not a checkpoint or a run directory with checkpoints") from None


def teacher_backbone(cfg: Config, state: dict[str, Any] | None, device: torch.device) -> torch.nn.Module:
    """The teacher backbone of a checkpoint's model state, or of a fresh model (seeded by train.seed)."""
    torch.manual_seed(cfg.train.seed)
    model = IBOT(cfg.model, cfg.loss)
    if state is not None:
        model.load_state_dict(state)
    return model.teacher.backbone.to(device).eval()


def knn_eval(backbone: torch.nn.Module, cfg: Config, train_spec: str, val_spec: str, *, k: int = 20,
             temperature: float = 0.07, batch_size: int = 128, device: torch.device | None = None) -> dict[str, Any]:
    device = device or next(backbone.parameters()).device
    amp = autocast_dtype(cfg.precision, device)
    feats = {}
    for name, spec in (("train", train_spec), ("val", val_spec)):
        feats[name] = extract_features(backbone, build_eval_dataset(spec, cfg), image_size=cfg.data.global_size,
                                       batch_size=batch_size, device=device, autocast_dtype=amp)
    result = weighted_knn(*feats["train"], *feats["val"], k=k, temperature=temperature)
    return {**result, "k": k, "temperature": temperature, "train": train_spec, "val": val_spec,
            "num_train": len(feats["train"][1]), "num_val": len(feats["val"][1])}


def knn_main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.random_init:
        if args.checkpoint:
            raise ValueError("give either --checkpoint or --random-init, not both")
        cfg = load_config(args.config, args.overrides)
        state, where = None, Path(cfg.run.dir)
    else:
        if not args.checkpoint:
            raise ValueError("--checkpoint is required (or --random-init with --config)")
        path = resolve_checkpoint(args.checkpoint)
        ckpt = load_consolidated(path)  # full tensors on the CPU, whatever world size / strategy saved it
        cfg = load_config(args.config, args.overrides) if args.config else config_from_dict(ckpt["config"])
        state, where = ckpt["model"], path.parent
    train_spec, val_spec = args.train, args.val
    if train_spec is None or val_spec is None:
        if not cfg.data.path.startswith("builtin:"):
            raise ValueError("--train and --val are required (labelled image folders) for a model not trained on "
                             "a built-in dataset")
        name = ":".join(cfg.data.path.split(":")[:2])
        train_spec, val_spec = train_spec or f"{name}:train", val_spec or f"{name}:val"
    result = knn_eval(teacher_backbone(cfg, state, device), cfg, train_spec, val_spec, k=args.k,
                      temperature=args.temperature, batch_size=args.batch_size, device=device)
    result["checkpoint"] = None if state is None else str(args.checkpoint)
    out = Path(args.out) if args.out else where / ("knn_random_init.json" if state is None else "knn.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_knn(result))
    return result
