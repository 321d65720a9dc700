"""Shared test settings: a tiny but real configuration of the whole engine."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

from ibot_engine.config import Config, load_config

# ViT-tiny at 32 px (4 x 4 patches of 8 px), 2 local crops of 16 px, K = 256, built-in data, fp32, one process.
TINY_OVERRIDES = [
    "model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32", "model.out_dim=256",
    "model.head_hidden_dim=128", "model.head_bottleneck_dim=64", "data.path=builtin:shapes", "data.builtin_size=96",
    "data.global_size=32", "data.local_size=16", "data.num_local=2", "data.num_workers=0", "train.batch_size=8",
    "train.log_every=1", "precision=fp32", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0",
    "loss.warmup_teacher_temp_epochs=1", "mask.min_block_patches=2",
]


def tiny_config(*extra: str) -> Config:
    """The tiny configuration with `extra` dotted overrides on top."""
    return load_config(None, [*TINY_OVERRIDES, *extra])


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def spawn_ranks(worker: Callable[..., None], world: int, *args) -> None:
    """Run `worker(rank, world, *args)` in `world` spawned processes; raises if any rank fails.

    Each rank leaves with `os._exit(0)` once its worker has returned (its results written, its process group
    destroyed), skipping the interpreter's finalisation. There, gloo and FSDP2 state still referenced by module
    globals (e.g. device meshes) are destroyed while the interpreter is torn down, and one run in 20 to 40
    aborted with "terminate called without an active exception" after both workers had returned (no Python
    frame on the stack; measured with faulthandler, 2026-12-07). The tests check what the workers wrote, which
    this exit does not touch; an exception in a worker still fails the test with its traceback."""
    mp.start_processes(_exit_after, args=(worker, world, *args), nprocs=world, start_method="spawn")


def _exit_after(rank: int, worker: Callable[..., None], world: int, *args) -> None:
    worker(rank, world, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
