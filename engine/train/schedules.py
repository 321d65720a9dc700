"""Every schedule as a pure function of the step (so resuming needs only the step).

Official iBOT semantics (bytedance/ibot `main_ibot.py`, `utils.cosine_scheduler`): lr linear warm-up from 0 then
cosine to min_lr, per iteration; weight decay cosine 0.04 -> 0.4 over all iterations; EMA momentum cosine 0.996 -> 1;
teacher temperature per *epoch* (`linspace(warmup, final, warmup_epochs)` then constant) or, as an option, per step
(DINOv2, lightly). With `train.schedule_unit=run` the three warm-up lengths (lr, frozen last layer, teacher
temperature) are fractions of the run's steps instead of epochs, so a recipe holds at any data set size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ibot_engine.config import Config


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at step `total` (clamped after)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    """Linear warm-up 0 -> peak over `warmup` steps (official: `linspace(0, peak, warmup)`), then cosine to final."""
    if step < warmup:
        return peak * step / max(warmup - 1, 1)
    return cosine(step - warmup, total - warmup, peak, final)


def teacher_temperature(step: int, steps_per_epoch: int, warmup_epochs: float, start: float, end: float,
                        per_step: bool) -> float:
    """Official: epoch e gets linspace(start, end, warmup_epochs)[e] (so the last warm-up epoch is at `end`);
    per_step: linear over warmup_epochs * steps_per_epoch steps."""
    if per_step:
        warmup = warmup_epochs * steps_per_epoch
        return end if step >= warmup else start + (end - start) * step / max(warmup, 1)
    n = round(warmup_epochs)
    epoch = step // steps_per_epoch
    if epoch >= n - 1 or n <= 1:
        return end
    return start + (end - start) * epoch / (n - 1)


def unfreeze_ramp(step: int, frozen: int, ramp: int) -> float:
    """`train.unfreeze_warmup_steps`: the backbone's lr factor, (k + 1) / (ramp + 1) at the k-th step after the
    `frozen` ones (k < ramp), else 1 (0 while frozen: its gradients are dropped then anyway)."""
    if step < frozen:
        return 0.0
    k = step - frozen
    return (k + 1) / (ramp + 1) if k < ramp else 1.0


@dataclass(frozen=True)
class Hyperparams:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    patch_teacher_temp: float
    freeze_last_layer: bool
    freeze_backbone: bool = False  # train.freeze_backbone_steps: drop the student backbone's gradients this step
    backbone_lr_factor: float = 1.0  # train.unfreeze_warmup_steps: the student backbone's share of this step's lr
    init_centers: bool = False  # loss.center_init=first_batch at step 0: centres <- this batch's teacher means


def batch_scaled(value: float, cfg: Config, world_size: int) -> float:
    """value * total_batch / 256: iBOT's linear scaling rule for a learning rate given per 256 images of the global
    batch, which counts the accumulated micro-batches (DINOv2 scales by the square root with reference 1024
    instead, so its learning rates do not carry over)."""
    return value * cfg.train.batch_size * world_size * cfg.train.accum_steps / 256.0


def peak_lr(cfg: Config, world_size: int) -> float:
    """The lr at the end of the warm-up: `optim.lr` scaled by the batch (`batch_scaled`)."""
    return batch_scaled(cfg.optim.lr, cfg, world_size)


def final_lr(cfg: Config, world_size: int) -> float:
    """The lr the cosine ends at: `optim.min_lr`, scaled by the batch as `optim.lr` is when `optim.scale_min_lr`
    (the same expression, so lr = min_lr gives a constant lr at any batch size)."""
    return batch_scaled(cfg.optim.min_lr, cfg, world_size) if cfg.optim.scale_min_lr else cfg.optim.min_lr


def hyperparams_at(step: int, cfg: Config, total_steps: int, steps_per_epoch: int, world_size: int) -> Hyperparams:
    """The hyperparameters of optimizer step `step` of a run of `total_steps` steps of `steps_per_epoch` each."""
    o, loss = cfg.optim, cfg.loss
    # Steps per unit of the warm-up lengths: an epoch, or the whole run (each length is then a fraction of it; the
    # temperature warm-up is then per step, which load_config requires: the per-epoch staircase of a fraction of a
    # short run would round to 0 or 1 "epochs").
    unit = total_steps if cfg.train.schedule_unit == "run" else steps_per_epoch
    warmup = round(o.warmup_epochs * unit)
    return Hyperparams(
        lr=warmup_cosine(step, total_steps, warmup, peak_lr(cfg, world_size), final_lr(cfg, world_size)),
        weight_decay=cosine(step, total_steps, o.weight_decay, o.weight_decay_end),
        momentum=cosine(step, total_steps, o.momentum_teacher, o.momentum_teacher_end),
        teacher_temp=teacher_temperature(step, unit, loss.warmup_teacher_temp_epochs, loss.warmup_teacher_temp,
                                         loss.teacher_temp, loss.teacher_temp_per_step),
        patch_teacher_temp=teacher_temperature(step, unit, loss.warmup_teacher_temp_epochs,
                                               loss.warmup_patch_teacher_temp, loss.patch_teacher_temp,
                                               loss.teacher_temp_per_step),
        freeze_last_layer=step < o.freeze_last_layer_epochs * unit,
        freeze_backbone=step < cfg.train.freeze_backbone_steps,
        backbone_lr_factor=unfreeze_ramp(step, cfg.train.freeze_backbone_steps, cfg.train.unfreeze_warmup_steps),
        init_centers=step == 0 and loss.center_init == "first_batch" and loss.centering == "center",
    )


def total_steps_for(cfg: Config, steps_per_epoch: int) -> int:
    """The run's length in steps: `train.steps`, or `train.epochs` x steps per epoch when it is 0."""
    return cfg.train.steps if cfg.train.steps > 0 else max(1, round(cfg.train.epochs * steps_per_epoch))
