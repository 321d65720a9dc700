"""The `Trainer`: everything the loop touches, built once from the config by `build_trainer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.checkpoint import Checkpointer, ShardedCheckpointer
from engine.config import Config, config_to_dict
from engine.data.stream import build_data_stream
from engine.distributed import DistEnv
from engine.model.attention import check_attention
from engine.model.ibot import IBOT, apply_train_options
from engine.train.optim import build_optimizer
from engine.train.parallel import apply_strategy, build_grad_scaler, check_strategy
from engine.train.schedules import total_steps_for


@dataclass
class Trainer:
    """Everything the loop touches; built once by `build_trainer`."""

    cfg: Config
    env: DistEnv
    model: IBOT
    student: nn.Module  # model.student (sharded in place under FSDP2), or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: Any  # engine.data.loader.DataStream or engine.data.shards.stream.ShardStream
    checkpointer: Checkpointer
    total_steps: int
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.data.state_dict(),
            "rng": rng,
            "config": config_to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def build_trainer(cfg: Config, env: DistEnv) -> Trainer:
    check_strategy(cfg, env)
    check_attention(cfg.model.attention, cfg.model.sdpa_backend, env.device)  # before the data and the model
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    data = build_data_stream(
        cfg.data, cfg.mask, batch_size=cfg.train.batch_size, patch_size=cfg.model.patch_size, seed=cfg.train.seed,
        rank=env.rank, world_size=env.world_size, device=env.device,
    )
    model = IBOT(cfg.model, cfg.loss).to(env.device)
    apply_train_options(model, cfg.train)  # activation checkpointing, compile: before the DDP / FSDP2 wrap
    student = apply_strategy(model, cfg, env)  # engine/train/parallel.py: none, DDP or FSDP2 (teacher too)
    optimizer = build_optimizer(model.student, cfg.optim, env.device)
    scaler = build_grad_scaler(cfg, env)
    return Trainer(
        cfg=cfg, env=env, model=model, student=student, optimizer=optimizer, scaler=scaler, data=data,
        checkpointer=ShardedCheckpointer(cfg.run.dir, cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save),
        total_steps=total_steps_for(cfg, data.steps_per_epoch),
    )
