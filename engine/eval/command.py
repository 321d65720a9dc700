"""`ibot eval knn` / `ibot eval linear`: frozen teacher-backbone features of a checkpoint, classified.

Datasets are labelled image folders (class sub-folders), local shards with labels, or the splits of a built-in
dataset (`builtin:patterns:train`, `builtin:patterns:val`; the default when the model was trained on `builtin:NAME`;
datasets.py). Under torchrun every rank extracts the features of a strided share of the images (features.py), so the
result equals a one-process run. The forward runs under bf16 autocast on GPU (`--precision auto`). Rank 0 prints
`k-NN top-1: 87.3%  top-5: 98.1%` and writes a JSON result. `evaluate` is the same without the command line.
"""


from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ibot_engine.checkpoint import read_checkpoint
from ibot_engine.config import Config, load_config, parse_overrides
from ibot_engine.config import _set as set_key
from ibot_engine.distributed import DistEnv, init_distributed, teardown
from ibot_engine.eval.datasets import default_specs
from ibot_engine.eval.features import teacher_backbone
from ibot_engine.eval.knn import format_knn, knn_eval
from ibot_engine.eval.linear import format_linear, linear_eval


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
    state, cfg, path = read_checkpoint(args.checkpoint)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides:  # on top of the checkpoint's own config
        for key, value in parse_overrides(args.overrides):
            set_key(cfg, key, value)
    return cfg, teacher_backbone(cfg, state, device, which), path.parent, True


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
        cfg, backbone, where, trained = load_eval_model(args, env.device)
        options: dict[str, Any] = {"batch_size": args.batch_size, "features": args.features,
                                   "precision": args.precision, "num_workers": args.num_workers}
        if kind == "knn":
            options.update(k=args.k, temperature=args.temperature)
        else:
            options.update(epochs=args.epochs, lrs=args.lrs)
        name = f"{kind}.json" if trained else f"{kind}_random_init.json"
        out = Path(args.out) if args.out else where / name
        return evaluate(kind, cfg, backbone, env, out, checkpoint=str(args.checkpoint) if trained else None,
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
