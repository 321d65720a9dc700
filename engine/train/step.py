"""One optimizer step of the trainer (`train_step`), and its forward half as a public function for loops other than
ours (Lightning, your own).

`forward_losses` is the forward half of `train_step`: teacher on the unmasked global crops, student on
the masked global and the local crops, then the objective with the current centres (or Sinkhorn-Knopp targets),
plus KoLeo on the student's global cls tokens when `loss.koleo_weight > 0`. The caller runs backward and then, in
this order: `model.update_centers(teacher, all_reduce_sum)` (EMA centres only), gradient clipping, the optimizer
step, and the teacher EMA (`kernels.ema_update_`). Autocast, if any, is the caller's (the objective is fp32 inside
whatever the logits' dtype).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from engine.config import Config
from engine.data.batch import Batch
from engine.distributed import all_gather_with_grad, all_reduce_sum, get_rank
from engine.health import health_metrics
from engine.model.ibot import IBOT, TeacherOutput
from engine.objective import IBOTLoss, ibot_loss, koleo_loss, sinkhorn_log_targets
from engine.train.optim import apply_hyperparams, clip_gradients_, last_layer_params
from engine.train.parallel import clip_sharded_gradients_
from engine.train.schedules import Hyperparams
from engine.train.trainer import Trainer


class ForwardOutput(NamedTuple):
    losses: IBOTLoss
    teacher: TeacherOutput  # what `model.update_centers` needs
    health: Tensor | None  # `engine.health.HEALTH_KEYS` values (fp32, on the device) when asked for, else None


def forward_losses(model: IBOT, batch: Batch, hp: Hyperparams, cfg: Config, student: nn.Module | None = None, *,
                   health: bool = False) -> ForwardOutput:
    """The iBOT loss of `batch` (on the model's device), the teacher outputs that update the centres, and (with
    `health`, e.g. on logging steps only) the training-health metrics of this step.

    Args:
        model: student, teacher and centres.
        batch: one rank's batch from the masking collate.
        hp: this step's hyperparameters (`engine.train.schedules.hyperparams_at`); only the teacher temperatures are
            read.
        cfg: the run config (`loss` and `data.num_global` are read).
        student: the module to call for the student pass, e.g. a DDP wrapper of `model.student` (default: it).
        health: also compute `engine.health.health_metrics` (a few reductions over tensors the step has anyway).
    """
    student = model.student if student is None else student
    teacher = model.teacher_forward(batch.global_crops, batch.mask_indices)
    student_cls, student_patch, student_tokens = student(batch.global_crops, batch.mask_indices, batch.masks,
                                                         batch.local_crops)
    teacher_cls, teacher_patch = teacher.cls_logits, teacher.patch_logits
    cls_center, patch_center = model.cls_center, model.patch_center
    temp, patch_temp = hp.teacher_temp, hp.patch_teacher_temp
    if cfg.loss.centering == "sinkhorn":
        # Targets as log-probabilities: centre 0 and temperature 1 reproduce them exactly in the kernel.
        teacher_cls = sinkhorn_log_targets(teacher_cls, temp, all_reduce=all_reduce_sum)
        teacher_patch = sinkhorn_log_targets(teacher_patch, patch_temp, all_reduce=all_reduce_sum)
        cls_center, patch_center = torch.zeros_like(cls_center), torch.zeros_like(patch_center)
        temp = patch_temp = 1.0
    losses = ibot_loss(
        student_cls, teacher_cls, student_patch, teacher_patch, batch.masks, cls_center, patch_center,
        temp, patch_temp, cfg.loss.student_temp, num_global=cfg.data.num_global,
        lambda_cls=cfg.loss.lambda_cls, lambda_patch=cfg.loss.lambda_patch,
    )
    if cfg.loss.koleo_weight > 0:  # nearest neighbours over the global batch: every rank's tokens are gathered
        koleo = koleo_loss(student_tokens, cfg.data.num_global, all_gather=all_gather_with_grad, rank=get_rank())
        losses = losses._replace(total=losses.total + cfg.loss.koleo_weight * koleo, koleo=koleo)
    stats = None
    if health:
        stats = health_metrics(teacher_cls, teacher_patch, cls_center, patch_center, temp, patch_temp,
                               student_tokens.detach(), teacher.cls_tokens)
    return ForwardOutput(losses, teacher, stats)


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
