"""The trainer's checkpoint state for `torch.distributed.checkpoint`: tensors only, keyed by parameter name.

    model.<IBOT name>          student, teacher (DTensor shards under FSDP2) and the two centres
    optimizer.<param>.<key>    AdamW's per-parameter state (exp_avg, exp_avg_sq, step), by student parameter name
    scaler.scale / .growth_tracker   fp16 only
    step, rng.torch (rng.cuda)

The data stream's position (epoch, batch, and for shards every rank's worker cursors) is JSON, not tensors: it goes
into the checkpoint's meta.json (`data_state` below), which rank 0 writes once the save is complete.

Names (not parameter ids or ranks) make the checkpoint independent of the strategy and the world size: DCP
reshards on load. The optimizer's param_groups are not saved: the trainer sets lr and weight decay every step and
the rest comes from the config, so nothing in a checkpoint needs unpickling. The RNG is the same on every rank
(one seed, same-shaped draws), so one copy is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ibot_engine.checkpoint import META, load_sharded
from ibot_engine.train.trainer import Trainer


def training_state(t: Trainer) -> dict[str, Any]:
    """This rank's state to pass to `ShardedCheckpointer.save` (or, as a template, to `load_sharded`)."""
    rng = {"torch": torch.get_rng_state()}
    if t.env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(t.env.device)
    state: dict[str, Any] = {
        "model": get_model_state_dict(t.model),
        "optimizer": get_optimizer_state_dict(t.model.student, t.optimizer)["state"],
        "step": torch.tensor(t.step, dtype=torch.int64),
        "rng": rng,
    }
    if t.scaler.is_enabled():
        scaler = t.scaler.state_dict()
        state["scaler"] = {"scale": torch.tensor(float(scaler["scale"])),
                           "growth_tracker": torch.tensor(int(scaler["_growth_tracker"]))}
    return state


def data_state(t: Trainer) -> dict[str, Any]:
    """The data stream's position for meta.json (collective for shard streams: call it on every rank)."""
    return t.data.state_dict()


def restore_training_state(t: Trainer, path: str | Path) -> None:
    """Load a sharded checkpoint into the trainer (collective; any strategy and world size saved it)."""
    state = load_sharded(path, training_state(t))  # the template initialises the optimizer state first
    set_model_state_dict(t.model, state["model"])
    groups = get_optimizer_state_dict(t.model.student, t.optimizer)["param_groups"]
    set_optimizer_state_dict(t.model.student, t.optimizer, {"state": state["optimizer"], "param_groups": groups})
    t.step = int(state["step"])
    meta = json.loads((Path(path) / META).read_text())
    if "data" not in meta:
        raise ValueError(f"checkpoint {str(path)!r}: {META} has no 'data' entry (the data stream's position)")
    t.data.load_state_dict(meta["data"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], t.env.device)
    if "scaler" in state:
        scaler = t.scaler.state_dict()
        scaler["scale"] = float(state["scaler"]["scale"])
        scaler["_growth_tracker"] = int(state["scaler"]["growth_tracker"])
        t.scaler.load_state_dict(scaler)
