"""The `Trainer`: everything the loop touches, built once from the config by `build_trainer`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ibot_engine.checkpoint import Checkpointer, ShardedCheckpointer
from ibot_engine.config import Config
from ibot_engine.data.augment import Augmenter
from ibot_engine.data.stream import BatchStream, build_data_stream
from ibot_engine.distributed import DistEnv
from ibot_engine.model.attention import check_attention
from ibot_engine.model.ibot import IBOT, apply_train_options
from ibot_engine.train.continuation import load_released_, resolve_start
from ibot_engine.train.optim import build_optimizer
from ibot_engine.train.parallel import apply_strategy, build_grad_scaler, check_strategy
from ibot_engine.train.schedules import total_steps_for


@dataclass
class Trainer:
    """Everything the loop touches; built once by `build_trainer`."""

    cfg: Config
    env: DistEnv
    model: IBOT
    student: nn.Module  # model.student (sharded in place under FSDP2), or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: BatchStream  # engine/data/stream.py: an image folder / built-in data or WebDataset shards
    checkpointer: Checkpointer
    total_steps: int
    step: int = 0  # its checkpoint state: engine/train/state.py

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the stream's batches per epoch over `train.accum_steps`."""
        return self.data.steps_per_epoch // self.cfg.train.accum_steps


def build_trainer(cfg: Config, env: DistEnv, initial_state: dict[str, Tensor] | None = None, *,
                  augmenter: Augmenter | None = None) -> Trainer:
    """`initial_state`: the model's starting weights (a full `IBOT` state dict, the same on every rank) in place of
    the config's random draw, loaded before the strategy wraps the model; a checkpoint resumed later replaces it.
    `augmenter`: the data stream's augmenter in place of the one `data.augment` names (`build_data_stream`).

    With `model.init_from`, the weights come from that file (engine/train/continuation.py) and the trainer's `cfg`
    is the config resolved from it (the model fields the file fixes, the effective freeze and centre rule): the
    config the run saves, so that it resumes."""
    check_strategy(cfg, env)
    check_attention(cfg.model.attention, cfg.model.sdpa_backend, env.device)  # before the data and the model
    if initial_state is not None and cfg.model.init_from:
        raise ValueError(f"model.init_from={cfg.model.init_from!r} and initial_state both give the starting weights: "
                         "pass one")
    # Reads and checks model.init_from's file (unless a checkpoint will be resumed): before the data and the model.
    cfg, released = resolve_start(cfg, Checkpointer(cfg.run.dir, cfg.checkpoint.keep))
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    data = build_data_stream(
        cfg.data, cfg.mask, batch_size=cfg.train.batch_size, patch_size=cfg.model.patch_size, seed=cfg.train.seed,
        rank=env.rank, world_size=env.world_size, device=env.device, augmenter=augmenter,
    )
    if data.steps_per_epoch < cfg.train.accum_steps:
        raise ValueError(f"train.accum_steps={cfg.train.accum_steps} is more than the {data.steps_per_epoch} batches "
                         "of an epoch; lower it or train.batch_size")
    model = IBOT(cfg.model, cfg.loss)
    if initial_state is not None:
        model.load_state_dict(initial_state, strict=True)
    elif released is not None:
        load_released_(model, released, cfg)
    model = model.to(env.device)
    apply_train_options(model, cfg.train)  # activation checkpointing, compile: before the DDP / FSDP2 wrap
    student = apply_strategy(model, cfg, env)  # engine/train/parallel.py: none, DDP or FSDP2 (teacher too)
    optimizer = build_optimizer(model.student, cfg.optim, env.device,
                                split_backbone=cfg.train.unfreeze_warmup_steps > 0)
    scaler = build_grad_scaler(cfg, env)
    return Trainer(
        cfg=cfg, env=env, model=model, student=student, optimizer=optimizer, scaler=scaler, data=data,
        checkpointer=ShardedCheckpointer(cfg.run.dir, cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save),
        total_steps=total_steps_for(cfg, data.steps_per_epoch // cfg.train.accum_steps),
    )
