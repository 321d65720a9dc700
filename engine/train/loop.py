"""`ibot train`: build everything from the config, then run the loop.

The loop reads top to bottom: schedules -> `train_step` -> log (the only host syncs) -> checkpoint. A non-finite
loss is accumulated into a device flag every step (no sync) and read at log and checkpoint boundaries, before any
checkpoint of that state is written: the run rolls back to the last good checkpoint and skips the batches that led
there (`train.on_nonfinite=rollback`, at most `train.max_rollbacks` times), or stops with a clear error. A stop
signal (SIGTERM, SIGUSR1: engine/preempt.py) ends the run after a step all ranks agree on, with a checkpoint of it,
and `Preempted` (exit code 75: requeue me).

With `eval.knn_every`, a fresh run's step-0 record holds the teacher's k-NN at random init and what it must beat
(engine/eval/knn.py: `knn_random_*` random features, `knn_pixels_*` raw pixels); the run ends with one block that
says by how many points the teacher's k-NN beats each, also returned as `baselines` in `train`'s result.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ibot_engine.checkpoint import is_sharded_checkpoint
from ibot_engine.config import Config, config_to_dict, save_config
from ibot_engine.distributed import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    teardown,
)
from ibot_engine.eval.knn import KnnEvaluator
from ibot_engine.objective import IBOTLoss
from ibot_engine.precision import autocast_dtype
from ibot_engine.preempt import Preempted, StopSignal
from ibot_engine.train.health import HEALTH_KEYS, CollapseDetector, NonFiniteLossError
from ibot_engine.train.metrics import MetricLogger, setup_logging
from ibot_engine.train.schedules import Hyperparams, hyperparams_at, peak_lr
from ibot_engine.train.state import data_state, restore_training_state, training_state
from ibot_engine.train.step import train_step
from ibot_engine.train.trainer import Trainer, build_trainer

log = logging.getLogger(__name__)


def train(cfg: Config, initial_state: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the last logged metrics (with `eval.knn_every`, also `baselines`: the
    step-0 k-NN of random features and raw pixels and the teacher's final lead over each, `_knn_summary`).
    `initial_state`: starting weights in place of the random draw (`build_trainer`), e.g. another implementation's
    draw for a paired comparison."""
    env = init_distributed()
    setup_logging(env.rank)
    try:
        return _train(cfg, env, initial_state)
    finally:
        teardown()


def _train(cfg: Config, env: DistEnv, initial_state: dict[str, Tensor] | None) -> dict[str, Any]:
    run_dir = _prepare_run_dir(cfg, env)
    t = build_trainer(cfg, env, initial_state)
    cfg = t.cfg  # resolved: with model.init_from, the model fields its file fixes
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
    _resume(t, run_dir)
    amp_dtype = autocast_dtype(cfg.precision, env.device)
    _log_run_summary(t, amp_dtype)
    metrics = MetricLogger(run_dir, t.total_steps, enabled=env.is_main, start_step=t.step,
                           tensorboard=cfg.run.tensorboard)
    # Builds the held-out datasets now: a bad eval.train / eval.val fails before step 1.
    knn = KnnEvaluator(cfg) if cfg.eval.knn_every else None
    # Watched from 10% of the run on: at initialisation every image gets nearly the same teacher output.
    detector = CollapseDetector(t.model.student.backbone.embed_dim, cfg.train.on_collapse,
                                start_step=t.total_steps // 10,
                                patch_term=cfg.loss.lambda_patch > 0 and cfg.mask.probability > 0)
    ema_pairs = t.model.ema_pairs()
    params = [p for p in t.model.student.parameters() if p.requires_grad]
    nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)
    last: dict[str, Any] = {}
    meter = _Meter(run_start_step=t.step)
    t.model.train()
    first: dict[str, Any] = {}  # the step-0 record of a fresh run: the k-NN at random init and the baselines
    if knn is not None and t.step == 0:  # where the k-NN curve starts from, and what it must beat
        first = {"step": 0, **_teacher_knn(t, knn, first=True), **knn.baselines(env)}
        metrics.log(first, eta_s=0.0)
        log.info("k-NN top-1 for the teacher to beat: %s",
                 ", ".join(f"{base} {value:.1f}%" for base, _, value in _baselines(first)))
        meter.restart()
    data_iter, rollbacks = iter(t.data), 0
    stop = StopSignal(env.world_size)  # SIGTERM / SIGUSR1 from here on: checkpoint at a step boundary, then stop
    try:
        while t.step < t.total_steps:
            hp = hyperparams_at(t.step, cfg, t.total_steps, t.steps_per_epoch, env.world_size)
            batch = [next(data_iter).to(env.device) for _ in range(cfg.train.accum_steps)]  # micro-batches
            meter.data_skipped += sum(b.num_skipped for b in batch)
            step = t.step + 1  # the step this iteration completes
            eval_now = knn is not None and (step % cfg.eval.knn_every == 0 or step == t.total_steps)
            log_now = step % cfg.train.log_every == 0 or step == t.total_steps or eval_now
            save_now = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.total_steps
            losses, grad_norm, stats = train_step(t, batch, hp, amp_dtype, ema_pairs, params, health=log_now)
            nonfinite |= ~torch.isfinite(losses.total.detach())
            t.step = step
            meter.interval_steps += 1
            # Every rank, every step (a CPU collective, no host sync); the last step ends the run anyway.
            stop_now = stop.should_stop() and step < t.total_steps
            save_now = save_now or stop_now
            if (log_now or save_now) and _nonfinite_on_any_rank(nonfinite):  # host sync: these steps only
                _roll_back(t, run_dir, metrics, rollbacks)  # or raise NonFiniteLossError
                data_iter, rollbacks = iter(t.data), rollbacks + 1
                nonfinite.zero_()
                continue
            if log_now:
                last, now = _metrics_record(t, hp, losses, grad_norm, stats, meter)
                if eval_now:  # k-NN of the teacher on the held-out set, all ranks (features are gathered)
                    last.update(_teacher_knn(t, knn))
                _log_step(t, last, now, detector, metrics, meter, run_dir)
            if save_now:  # every rank writes its shards; `latest` moves once the save is complete (async: later)
                meta = {"config": config_to_dict(cfg), "data": data_state(t)}
                saved = t.checkpointer.save(t.step, training_state(t), meta)
            if stop_now:
                _stop_for_requeue(t, stop, saved, metrics)  # raises Preempted
        t.checkpointer.wait()
    finally:
        stop.close()
        t.data.close()  # its workers ignore SIGTERM: stopped here, not left to multiprocessing's exit hook
        metrics.close()
    if last and math.isfinite(last["loss"]):
        log.info("done: %d steps, final loss %.4f", t.step, last["loss"])
    if last:
        last["collapse"] = list(detector.fired)  # every collapse reported during this run (empty: none)
    if "knn_top1" in last:
        # A resumed run reads its step-0 record back (rank 0's file, for all ranks).
        first = first or broadcast_object(_step0_record(run_dir) if env.is_main else None) or {}
        last["baselines"] = _knn_summary(last, first, cfg.eval.features)
    return last


@dataclass
class _Meter:
    """Host-side counters of the run (for the ETA) and of the current logging interval (for img/s)."""

    run_start_step: int
    run_start: float = field(default_factory=time.perf_counter)
    interval_start: float = field(default_factory=time.perf_counter)
    interval_steps: int = 0
    data_skipped: int = 0  # unreadable samples / shards skipped by the data stream since the last log line

    def restart(self) -> None:
        """Start the clocks again (after the step-0 k-NN, which is not training time)."""
        self.interval_start = self.run_start = time.perf_counter()

    def end_interval(self) -> None:
        self.interval_start, self.interval_steps, self.data_skipped = time.perf_counter(), 0, 0


def _prepare_run_dir(cfg: Config, env: DistEnv) -> Path:
    """The run directory, created (rank 0); `_train` writes the trainer's resolved config.yaml into it."""
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _resume(t: Trainer, run_dir: Path) -> None:
    """Load the checkpoint `checkpoint.resume` names (rank 0's choice, for all ranks), if any, and drop the metrics
    records past its step."""
    resume = broadcast_object(t.checkpointer.resolve_resume(t.cfg.checkpoint.resume))
    if resume is not None and not is_sharded_checkpoint(resume):
        raise ValueError(f"checkpoint.resume: {str(resume)!r} is a single-file checkpoint; training resumes only from "
                         "the sharded checkpoint directories it writes (evaluation and export read both)")
    if resume is not None:
        restore_training_state(t, resume)  # any world size / strategy saved it: DCP reshards
        log.info("resumed from %s at step %d", resume, t.step)
    if t.env.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", t.step)  # records past the resumed step are superseded


def _log_run_summary(t: Trainer, amp_dtype: torch.dtype | None) -> None:
    cfg, env = t.cfg, t.env
    log.info(
        "ibot: %s/%d, %d params, device %s x %d, precision %s, %d images, %d steps/epoch, %d steps, peak lr %.2e",
        cfg.model.arch, cfg.model.patch_size, sum(p.numel() for p in t.model.student.parameters()), env.device,
        env.world_size, "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."), t.data.num_samples,
        t.steps_per_epoch, t.total_steps, peak_lr(cfg, env.world_size),
    )


def _nonfinite_on_any_rank(nonfinite: Tensor) -> bool:
    """Whether any rank saw a non-finite loss since the flag was last cleared. A host sync and a collective: call
    it on every rank, at log / checkpoint boundaries only."""
    return bool(all_reduce_sum(nonfinite.float()).item())


def _roll_back(t: Trainer, run_dir: Path, metrics: MetricLogger, rollbacks: int) -> None:
    """After a non-finite loss (every rank calls this together): restore the last good checkpoint, keep the data
    stream where it is (the batches since that checkpoint, which led to the failure, are skipped), drop the metrics
    records past the checkpoint and record the rollback. Raises `NonFiniteLossError` instead under
    `train.on_nonfinite=stop`, without a checkpoint, or once `train.max_rollbacks` are spent."""
    cfg = t.cfg.train
    t.checkpointer.wait()  # an async save in flight is the last good state
    good = broadcast_object(t.checkpointer.latest())  # rank 0's view of the run directory, for all ranks
    if cfg.on_nonfinite == "stop" or good is None or rollbacks >= cfg.max_rollbacks:
        why = ("train.on_nonfinite=stop" if cfg.on_nonfinite == "stop" else "no checkpoint to roll back to"
               if good is None else f"train.max_rollbacks={cfg.max_rollbacks} rollbacks already made")
        raise NonFiniteLossError(
            f"non-finite loss at or before step {t.step}; stopping ({why}). Last good checkpoint: {good or 'none'}. "
            "Try precision=bf16 or fp32, a lower optim.lr, or a longer warm-up."
        )
    failed_step, position = t.step, t.data.state_dict()
    restore_training_state(t, good)
    t.data.load_state_dict(position)  # skip, rather than replay, the batches since the checkpoint
    if t.env.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", t.step)
    skipped = (failed_step - t.step) * cfg.accum_steps
    log.warning("non-finite loss at or before step %d: rolled back to %s (step %d), skipping the %d batches since "
                "(rollback %d of at most %d)", failed_step, good, t.step, skipped, rollbacks + 1, cfg.max_rollbacks)
    metrics.log({"step": t.step, "rollback": {"failed_step": failed_step, "checkpoint": str(good),
                                              "skipped_batches": skipped, "count": rollbacks + 1}}, eta_s=0.0)


def _stop_for_requeue(t: Trainer, stop: StopSignal, saved: Path, metrics: MetricLogger) -> None:
    """After a stop signal (every rank, same step): let the checkpoint of this step finish, record the stop in the
    metrics (kept on resume, which truncates past this step) and raise `Preempted`."""
    t.checkpointer.wait()  # an async save must be complete before the process exits
    log.warning("stopped on %s after step %d of %d: resume from %s (same command; checkpoint.resume=auto)",
                stop.signal_name, t.step, t.total_steps, saved)
    metrics.log({"step": t.step, "preempted": {"signal": stop.signal_name, "checkpoint": str(saved)}}, eta_s=0.0)
    stop.ignore_further_signals()  # this process exits next, with code 75 whatever else is sent to it
    raise Preempted(t.step, stop.signal_name, str(saved))


def _teacher_knn(t: Trainer, knn: KnnEvaluator, first: bool = False) -> dict[str, float]:
    """k-NN of the teacher on the held-out set (every rank takes part). `first`: before any training step."""
    if first and t.cfg.distributed.strategy == "fsdp":
        # FSDP2 sets its units up at the root's first forward; the k-NN runs the backbone alone, which would make
        # each block a root. One forward of the teacher root first (a blank image, no grad, no RNG draw).
        size = t.cfg.data.global_size
        with torch.no_grad():
            t.model.teacher(torch.zeros(1, 3, size, size, device=t.env.device), None)
    return knn(t.model.teacher, t.env)


def _baselines(first: dict[str, Any], suffix: str = "") -> list[tuple[str, str, float]]:
    """(label, name, top-1) of each baseline the step-0 record `first` holds, for the teacher's features
    eval.features (`suffix` "") or cls+patch (`_clspatch`)."""
    keys = (("random features", f"random{suffix}", f"knn_random{suffix}_top1"),
            ("raw pixels", f"pixels{suffix}", "knn_pixels_top1"))
    return [(label, name, first[key]) for label, name, key in keys if key in first]


def _knn_summary(last: dict[str, Any], first: dict[str, Any], features: str) -> dict[str, float]:
    """Logs the teacher's k-NN top-1 at the end (eval.features and cls+patch) against the baselines of the step-0
    record `first`; returns those baselines and `beats_random`, `beats_pixels` (+ `_clspatch`): the teacher's top-1
    minus each, in points (negative: it falls short)."""
    out = {k: v for k, v in first.items() if k.startswith(("knn_random_", "knn_pixels_"))}
    lines = []
    for label, suffix in ((features, ""), ("cls+patch", "_clspatch")):
        top1, found = last[f"knn{suffix}_top1"], _baselines(first, suffix)
        out.update({f"beats_{name}": top1 - value for _, name, value in found})
        lines.append(f"  teacher {label:<9} {top1:5.1f}%" +
                     "".join(f"   {base} {value:.1f}% ({top1 - value:+.1f})" for base, _, value in found))
    log.info("k-NN top-1 on the held-out set at step %d, against random features (no LayerScale, untrained) and "
             "raw pixels, measured at step 0 (the teacher's lead in points):\n%s", last["step"],
             "\n".join(dict.fromkeys(lines)))  # eval.features=cls+patch: its two lines are one
    if out.get("beats_random", 1.0) <= 0:
        log.warning("the teacher's k-NN (%s) is no better than random features after %d steps (%+.1f points): this "
                    "run has not learned features worth its compute; see docs/learning.md", features, last["step"],
                    out["beats_random"])
    return out


def _step0_record(run_dir: Path) -> dict[str, Any]:
    """The step-0 k-NN record of RUN_DIR/metrics.jsonl (the teacher at random init and the baselines), or {}."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return next((r for r in records if r["step"] == 0 and "knn_top1" in r), {})


def _metrics_record(t: Trainer, hp: Hyperparams, losses: IBOTLoss, grad_norm: Tensor, stats: Tensor,
                    meter: _Meter) -> tuple[dict[str, Any], float]:
    """The metrics record of this logging step, and the time it was taken at."""
    env = t.env
    # The loss of the global batch: the mean of the per-rank means (equal batches on every rank), the health
    # metrics (per-rank values averaged) and the skipped-sample count of all ranks (mean x world size), in one
    # all-reduce at logging steps only; grad_norm is already global. Then the host sync.
    skipped = torch.tensor(float(meter.data_skipped), device=env.device)
    koleo = [losses.koleo.detach().float()] if losses.koleo is not None else []
    local = torch.cat([torch.stack([losses.total.detach().float(), losses.cls.detach().float(),
                                    losses.patch.detach().float(), skipped, *koleo]), stats])
    values = torch.cat([grad_norm.float().reshape(1), all_reduce_mean(local)]).tolist()
    grad_norm_value, (loss, loss_cls, loss_patch, skipped_mean), rest = values[0], values[1:5], values[5:]
    now = time.perf_counter()
    images_per_step = t.cfg.train.batch_size * env.world_size * t.cfg.train.accum_steps
    record = {
        "step": t.step, "loss": loss, "loss_cls": loss_cls, "loss_patch": loss_patch,
        **({"loss_koleo": rest.pop(0)} if koleo else {}),
        "lr": hp.lr, "weight_decay": hp.weight_decay, "momentum": hp.momentum,
        "teacher_temp": hp.teacher_temp, "patch_teacher_temp": hp.patch_teacher_temp,
        "grad_norm": grad_norm_value,
        "img_per_s": images_per_step * meter.interval_steps / (now - meter.interval_start),
        "max_memory_gib": max_memory_gib(env.device), "epoch": t.step / t.steps_per_epoch,
        "data_skipped": round(skipped_mean * env.world_size),  # every rank's, since the last log line
        **dict(zip(HEALTH_KEYS, rest, strict=True)),
    }
    return record, now


def _log_step(t: Trainer, record: dict[str, Any], now: float, detector: CollapseDetector, metrics: MetricLogger,
              meter: _Meter, run_dir: Path) -> None:
    """Check for collapse, write the record (and the ETA), then start the next logging interval."""
    env = t.env
    collapse = detector.update(t.step, record)  # a warning, once per kind of collapse
    if collapse:
        record["collapse"] = collapse
    per_step = (now - meter.run_start) / max(t.step - meter.run_start_step, 1)
    metrics.log(record, eta_s=per_step * (t.total_steps - t.step))
    detector.stop_if_asked(collapse)  # train.on_collapse=stop: after the record is written
    if t.cfg.distributed.log_all_ranks and not env.is_main:  # launcher checks: every rank's view
        with open(run_dir / f"metrics.rank{env.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    meter.end_interval()
    if env.device.type == "cuda":  # max_memory_gib: the peak of each logging interval
        torch.cuda.reset_peak_memory_stats(env.device)


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
