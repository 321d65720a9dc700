"""Shared test settings: a tiny but real configuration of the whole engine."""

from __future__ import annotations

import json
from pathlib import Path

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
