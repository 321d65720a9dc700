"""`ibot train`: build everything from the config, then run the loop.

The loop reads top to bottom: schedules -> `train_step` -> log (the only host syncs) -> checkpoint. A non-finite
loss is accumulated into a device flag every step (no sync) and read at log and checkpoint boundaries: the run
stops with a clear error before any checkpoint of a non-finite state is written, so the last good one survives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.checkpoint import Checkpointer, ShardedCheckpointer, is_sharded_checkpoint, load_checkpoint
from engine.config import Config, config_to_dict, save_config
from engine.data.loader import Batch, build_data_stream
from engine.distributed import DistEnv, all_reduce_mean, all_reduce_sum, broadcast_object, init_distributed, teardown
from engine.health import HEALTH_KEYS, CollapseDetector
from engine.logging import MetricLogger, setup_logging
from engine.model.attention import check_attention
from engine.model.ibot import IBOT, apply_train_options
from engine.objective import IBOTLoss
from engine.optim import apply_hyperparams, build_optimizer, clip_gradients_, last_layer_params
from engine.parallel import apply_strategy, build_grad_scaler, check_strategy, clip_sharded_gradients_
from engine.schedules import Hyperparams, hyperparams_at, peak_lr
from engine.step import forward_losses
from engine.train_state import data_state, restore_training_state, training_state

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Trainer:
    """Everything the loop touches; built once by `build_trainer`."""

    cfg: Config
    env: DistEnv
    model: IBOT
    student: nn.Module  # model.student (sharded in place under FSDP2), or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: Any  # engine.data.loader.DataStream
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def total_steps_for(cfg: Config, steps_per_epoch: int) -> int:
    return cfg.train.steps if cfg.train.steps > 0 else max(1, round(cfg.train.epochs * steps_per_epoch))


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
    student = apply_strategy(model, cfg, env)  # engine/parallel.py: none, DDP or FSDP2 (teacher too)
    optimizer = build_optimizer(model.student, cfg.optim, env.device)
    scaler = build_grad_scaler(cfg, env)
    return Trainer(
        cfg=cfg, env=env, model=model, student=student, optimizer=optimizer, scaler=scaler, data=data,
        checkpointer=ShardedCheckpointer(cfg.run.dir, cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save),
        total_steps=total_steps_for(cfg, data.steps_per_epoch),
    )


def train_step(t: Trainer, batch: Batch, hp: Hyperparams, amp_dtype: torch.dtype | None,
               ema_pairs: tuple[list[Tensor], list[Tensor]], params: list[Tensor],
               health: bool = False) -> tuple[IBOTLoss, Tensor, Tensor | None]:
    """One optimizer step; returns the losses, the gradient norm and (with `health`: logging steps) the
    training-health metrics, all device tensors: nothing here waits for the device."""
    cfg, model = t.cfg, t.model
    apply_hyperparams(t.optimizer, hp.lr, hp.weight_decay)
    amp = torch.autocast(t.env.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with amp:  # the DDP / FSDP wrapper runs the student
        losses, teacher, stats = forward_losses(model, batch, hp, cfg, student=t.student, health=health)
    t.scaler.scale(losses.total).backward()
    if cfg.loss.centering == "center":
        model.update_centers(teacher, all_reduce_sum)  # after the loss used the previous centres
    t.scaler.unscale_(t.optimizer)
    clip = clip_sharded_gradients_ if cfg.distributed.strategy == "fsdp" else clip_gradients_
    grad_norm = clip(params, cfg.optim.clip_grad, cfg.optim.clip_mode)
    if hp.freeze_last_layer:  # the step is known on the host: no sync to decide this
        for p in last_layer_params(t.optimizer):
            p.grad = None  # AdamW skips parameters without gradients: no update, no decay
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    model.update_teacher(hp.momentum, ema_pairs)
    return losses, grad_norm, stats


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics records of steps <= `step` (all of them gone for a fresh run)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines() if step > 0 else []
    kept = [line for line in lines if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def max_memory_gib(device: torch.device) -> float:
    """Peak allocated memory since the last log line (CUDA), or the process's peak RSS so far (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS, KiB on Linux


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the last logged metrics."""
    env = init_distributed()
    setup_logging(env.rank)
    try:
        return _train(cfg, env)
    finally:
        teardown()


def _train(cfg: Config, env: DistEnv) -> dict[str, Any]:
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    t = build_trainer(cfg, env)
    resume = broadcast_object(t.checkpointer.resolve_resume(cfg.checkpoint.resume))  # rank 0's choice for all
    if resume is not None and is_sharded_checkpoint(resume):
        restore_training_state(t, resume)  # any world size / strategy saved it: DCP reshards
        log.info("resumed from %s at step %d", resume, t.step)
    elif resume is not None:
        t.load_state_dict(load_checkpoint(resume))  # legacy single-file checkpoint
        log.info("resumed from %s at step %d", resume, t.step)
    if env.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", t.step)  # records past the resumed step are superseded
    amp_dtype = autocast_dtype(cfg.precision, env.device)
    log.info(
        "ibot: %s/%d, %d params, device %s x %d, precision %s, %d images, %d steps/epoch, %d steps, peak lr %.2e",
        cfg.model.arch, cfg.model.patch_size, sum(p.numel() for p in t.model.student.parameters()), env.device,
        env.world_size, "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."), t.data.num_samples,
        t.data.steps_per_epoch, t.total_steps, peak_lr(cfg, env.world_size),
    )
    metrics = MetricLogger(run_dir, t.total_steps, enabled=env.is_main, start_step=t.step,
                           tensorboard=cfg.run.tensorboard)
    knn_every = cfg.eval.knn_every
    if knn_every:
        from engine.evaluate import KnnEvaluator  # imports this module

        knn_evaluator = KnnEvaluator(cfg)  # builds the held-out datasets now: a bad path fails before step 1
    # Watched from 10% of the run on: at initialisation every image gets nearly the same teacher output.
    detector = CollapseDetector(t.model.student.backbone.embed_dim, cfg.train.on_collapse,
                                start_step=t.total_steps // 10,
                                patch_term=cfg.loss.lambda_patch > 0 and cfg.mask.probability > 0)
    ema_pairs = t.model.ema_pairs()
    params = [p for p in t.model.student.parameters() if p.requires_grad]
    nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)
    last: dict[str, Any] = {}
    images_per_step = cfg.train.batch_size * env.world_size
    interval_start, interval_steps, run_start_step, run_start = time.perf_counter(), 0, t.step, time.perf_counter()
    data_skipped = 0  # unreadable samples / shards skipped by the data stream since the last log line (host ints)

    def check_finite() -> None:
        # Host sync, only at log / checkpoint boundaries; over all ranks, so that all stop (or save) together.
        if all_reduce_sum(nonfinite.float()).item():
            good = t.checkpointer.latest()
            raise NonFiniteLossError(
                f"non-finite loss at or before step {t.step}; stopping. Last good checkpoint: {good or 'none'}. "
                "Try precision=bf16 or fp32, a lower optim.lr, or a longer warm-up."
            )

    t.model.train()
    if knn_every and t.step == 0:  # the random-init baseline the k-NN curve starts from
        if cfg.distributed.strategy == "fsdp":
            # FSDP2 sets its units up at the root's first forward; the k-NN runs the backbone alone, which would make
            # each block a root. One forward of the teacher root first (a blank image, no grad, no RNG draw).
            size = cfg.data.global_size
            with torch.no_grad():
                t.model.teacher(torch.zeros(1, 3, size, size, device=env.device), None)
        metrics.log({"step": 0, **knn_evaluator(t.model.teacher, env)}, eta_s=0.0)
        interval_start = run_start = time.perf_counter()
    data_iter = iter(t.data)
    try:
        while t.step < t.total_steps:
            hp = hyperparams_at(t.step, cfg, t.total_steps, t.data.steps_per_epoch, env.world_size)
            batch = next(data_iter).to(env.device)
            data_skipped += int(getattr(batch, "num_skipped", 0))
            step = t.step + 1  # the step this iteration completes
            eval_now = bool(knn_every) and (step % knn_every == 0 or step == t.total_steps)
            log_now = step % cfg.train.log_every == 0 or step == t.total_steps or eval_now
            losses, grad_norm, stats = train_step(t, batch, hp, amp_dtype, ema_pairs, params, health=log_now)
            nonfinite |= ~torch.isfinite(losses.total.detach())
            t.step = step
            interval_steps += 1
            if log_now:
                check_finite()
                # The loss of the global batch: the mean of the per-rank means (equal batches on every rank), the
                # health metrics (per-rank values averaged) and the skipped-sample count of all ranks (mean x world
                # size), in one all-reduce at logging steps only; grad_norm is already global. Then the host sync.
                skipped = torch.tensor(float(data_skipped), device=env.device)
                koleo = [losses.koleo.detach().float()] if losses.koleo is not None else []
                local = torch.cat([torch.stack([losses.total.detach().float(), losses.cls.detach().float(),
                                                losses.patch.detach().float(), skipped, *koleo]), stats])
                values = torch.cat([grad_norm.float().reshape(1), all_reduce_mean(local)]).tolist()
                grad_norm_value, (loss, loss_cls, loss_patch, skipped_mean), rest = values[0], values[1:5], values[5:]
                now = time.perf_counter()
                last = {
                    "step": t.step, "loss": loss, "loss_cls": loss_cls, "loss_patch": loss_patch,
                    **({"loss_koleo": rest.pop(0)} if koleo else {}),
                    "lr": hp.lr, "weight_decay": hp.weight_decay, "momentum": hp.momentum,
                    "teacher_temp": hp.teacher_temp, "patch_teacher_temp": hp.patch_teacher_temp,
                    "grad_norm": grad_norm_value,
                    "img_per_s": images_per_step * interval_steps / (now - interval_start),
                    "max_memory_gib": max_memory_gib(env.device), "epoch": t.step / t.data.steps_per_epoch,
                    "data_skipped": round(skipped_mean * env.world_size),  # every rank's, since the last log line
                    **dict(zip(HEALTH_KEYS, rest, strict=True)),
                }
                if eval_now:  # k-NN of the teacher on the held-out set, all ranks (features are gathered)
                    last.update(knn_evaluator(t.model.teacher, env))
                collapse = detector.update(t.step, last)  # a warning, once per kind of collapse
                if collapse:
                    last["collapse"] = collapse
                per_step = (now - run_start) / max(t.step - run_start_step, 1)
                metrics.log(last, eta_s=per_step * (t.total_steps - t.step))
                detector.stop_if_asked(collapse)  # train.on_collapse=stop: after the record is written
                if cfg.distributed.log_all_ranks and not env.is_main:  # launcher checks: every rank's view
                    with open(run_dir / f"metrics.rank{env.rank}.jsonl", "a") as f:
                        f.write(json.dumps(last) + "\n")
                interval_start, interval_steps, data_skipped = time.perf_counter(), 0, 0
                if env.device.type == "cuda":  # max_memory_gib: the peak of each logging interval
                    torch.cuda.reset_peak_memory_stats(env.device)
            if (cfg.checkpoint.every and t.step % cfg.checkpoint.every == 0) or t.step == t.total_steps:
                check_finite()
                # Every rank writes its shards; `latest` moves once the save is complete (async: later).
                meta = {"config": config_to_dict(cfg), "data": data_state(t)}
                t.checkpointer.save(t.step, training_state(t), meta)
        t.checkpointer.wait()
    finally:
        metrics.close()
    if last and math.isfinite(last["loss"]):
        log.info("done: %d steps, final loss %.4f", t.step, last["loss"])
    if last:
        last["collapse"] = list(detector.fired)  # every collapse reported during this run (empty: none)
    return last
