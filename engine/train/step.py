"""One optimizer step of the trainer (`train_step`), and its forward half as a public function for loops other than
ours (Lightning, your own).

`forward_losses` is the forward half of `train_step`: teacher on the unmasked global crops, student on
the masked global and the local crops, then the objective with the current centres (or Sinkhorn-Knopp targets),
plus KoLeo on the student's global cls tokens when `loss.koleo_weight > 0`. The caller runs backward and then, in
this order: `model.update_centers(teacher, all_reduce_sum)` (EMA centres only), gradient clipping, the optimizer
step, and the teacher EMA (`ibot_kernels.ema_update_`). Autocast, if any, is the caller's (the objective is fp32 inside
whatever the logits' dtype). Runs continued from released weights add two steps when their hyperparameters say so:
`init_centers_` before the first loss (`hp.init_centers`) and `drop_backbone_gradients_` before clipping
(`hp.freeze_backbone`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ibot_engine.config import Config
from ibot_engine.data.batch import Batch
from ibot_engine.distributed import all_gather_with_grad, all_reduce_sum, get_rank
from ibot_engine.model.ibot import IBOT, TeacherOutput
from ibot_engine.objective import IBOTLoss, ibot_loss, koleo_loss, sinkhorn_log_targets, update_centers_
from ibot_engine.train.health import health_metrics
from ibot_engine.train.optim import apply_hyperparams, clip_gradients_, last_layer_params
from ibot_engine.train.parallel import clip_sharded_gradients_
from ibot_engine.train.schedules import Hyperparams
from ibot_engine.train.trainer import Trainer


class ForwardOutput(NamedTuple):
    losses: IBOTLoss
    teacher: TeacherOutput  # what `model.update_centers` needs
    health: Tensor | None  # `HEALTH_KEYS` values (health.py; fp32, on the device) when asked for, else None


def forward_losses(model: IBOT, batch: Batch, hp: Hyperparams, cfg: Config, student: nn.Module | None = None, *,
                   health: bool = False, teacher: TeacherOutput | None = None,
                   targets: tuple[Tensor, Tensor] | None = None) -> ForwardOutput:
    """The iBOT loss of `batch` (on the model's device), the teacher outputs that update the centres, and (with
    `health`, e.g. on logging steps only) the training-health metrics of this step.

    Args:
        model: student, teacher and centres.
        batch: one rank's batch from the masking collate.
        hp: this step's hyperparameters (`ibot_engine.train.schedules.hyperparams_at`); only the teacher temperatures
            are read.
        cfg: the run config (`loss` and `data.num_global` are read).
        student: the module to call for the student pass, e.g. a DDP wrapper of `model.student` (default: it).
        health: also compute `health.health_metrics` (a few reductions over tensors the step has anyway).
        teacher, targets: this batch's teacher outputs and Sinkhorn-Knopp log-targets (cls, patch), when the caller
            computed them over a larger batch (gradient accumulation); default: from this batch.
    """
    student = model.student if student is None else student
    teacher = model.teacher_forward(batch.global_crops, batch.mask_indices) if teacher is None else teacher
    student_cls, student_patch, student_tokens = student(batch.global_crops, batch.mask_indices, batch.masks,
                                                         batch.local_crops)
    teacher_cls, teacher_patch = teacher.cls_logits, teacher.patch_logits
    cls_center, patch_center = model.cls_center, model.patch_center
    temp, patch_temp = hp.teacher_temp, hp.patch_teacher_temp
    if cfg.loss.centering == "sinkhorn":
        # Targets as log-probabilities: centre 0 and temperature 1 reproduce them exactly in the kernel.
        teacher_cls, teacher_patch = targets if targets is not None else sinkhorn_targets(teacher, hp)
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


def sinkhorn_targets(teacher: TeacherOutput, hp: Hyperparams) -> tuple[Tensor, Tensor]:
    """Sinkhorn-Knopp log-targets (cls, patch) of the teacher outputs, over every rank's rows."""
    return (sinkhorn_log_targets(teacher.cls_logits, hp.teacher_temp, all_reduce=all_reduce_sum),
            sinkhorn_log_targets(teacher.patch_logits, hp.patch_teacher_temp, all_reduce=all_reduce_sum))


def joined_teacher_outputs(teachers: list[TeacherOutput]) -> TeacherOutput:
    """The teacher outputs of several micro-batches as those of their concatenation (what the centres need)."""
    if len(teachers) == 1:
        return teachers[0]
    return TeacherOutput(
        cls_logits=torch.cat([t.cls_logits for t in teachers]),
        patch_logits=torch.cat([t.patch_logits for t in teachers]),
        patch_sum=torch.stack([t.patch_sum for t in teachers]).sum(0),
        patch_count=sum(t.patch_count for t in teachers),
        cls_tokens=torch.cat([t.cls_tokens for t in teachers]),
    )


@torch.no_grad()
def init_centers_(model: IBOT, teacher: TeacherOutput) -> None:
    """`loss.center_init=first_batch`: both centres <- the teacher's mean cls / patch logits of this batch over
    every rank (the centre update with momentum 0: the same statistics and the same all-reduce)."""
    update_centers_(model.cls_center, model.patch_center, teacher.cls_logits, teacher.patch_sum, teacher.patch_count,
                    0.0, all_reduce_sum)


def drop_backbone_gradients_(model: IBOT) -> None:
    """`train.freeze_backbone_steps`: no update of the student backbone this step. AdamW skips a parameter without a
    gradient entirely: no move, no weight decay, and no moment or step count updated, so the backbone's Adam state
    starts when it unfreezes. (An lr of 0 would also keep it still, but its moments would take in the gradients of
    the fresh heads and steer its first unfrozen steps.)"""
    for p in model.student.backbone.parameters():
        p.grad = None


@contextlib.contextmanager
def _gradient_sync(student: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's all-reduce / FSDP2's reduce-scatter of the gradients unless `sync` (the last micro-batch)."""
    if sync:
        yield
    elif isinstance(student, DistributedDataParallel):
        with student.no_sync():
            yield
    elif hasattr(student, "set_requires_gradient_sync"):  # FSDP2 (fully_shard) modules
        student.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            student.set_requires_gradient_sync(True)
    else:
        yield


def train_step(t: Trainer, batch: Batch | list[Batch], hp: Hyperparams, amp_dtype: torch.dtype | None,
               ema_pairs: tuple[list[Tensor], list[Tensor]], params: list[Tensor],
               health: bool = False) -> tuple[IBOTLoss, Tensor, Tensor | None]:
    """One optimizer step, over one batch or over the `train.accum_steps` micro-batches of a list; returns the
    losses, the gradient norm and (with `health`: logging steps) the training-health metrics, all device tensors:
    nothing here waits for the device.

    Gradient accumulation is the step on the concatenated batch: each micro-batch's loss (a mean over its images)
    is scaled by 1 / N, so the summed gradient is that of the big batch's mean; the losses use the centres from
    before the step and the centres move once, by the whole batch's teacher outputs; Sinkhorn-Knopp targets are
    computed over every micro-batch's teacher outputs at once; the gradients are synchronised over ranks only on
    the last micro-batch; clipping, the optimizer, the EMA and the logged losses follow the big batch. Not exact:
    KoLeo (its nearest neighbours are searched within each micro-batch), stochastic depth (its draws follow the
    micro-batches) and DINOv2 masks (drawn per batch); the health metrics are the last micro-batch's.

    Continuation (engine/train/continuation.py): with `hp.init_centers` (step 0 of `loss.center_init=first_batch`)
    the centres are set to the whole batch's teacher means before the first loss; with `hp.freeze_backbone` the
    student backbone's gradients are dropped before clipping (`drop_backbone_gradients_`)."""
    cfg, model = t.cfg, t.model
    batches = batch if isinstance(batch, list) else [batch]
    n = len(batches)
    apply_hyperparams(t.optimizer, hp.lr, hp.weight_decay, hp.backbone_lr_factor)
    amp = torch.autocast(t.env.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    teachers: list[TeacherOutput | None] = [None] * n
    targets: list[tuple[Tensor, Tensor] | None] = [None] * n
    sinkhorn_first = cfg.loss.centering == "sinkhorn" and n > 1  # targets need the whole batch's teacher outputs
    if sinkhorn_first or hp.init_centers:
        with amp:
            teachers = [model.teacher_forward(b.global_crops, b.mask_indices) for b in batches]
    if hp.init_centers:  # loss.center_init=first_batch: the first loss centres by this batch's own means
        init_centers_(model, joined_teacher_outputs(teachers))
    if sinkhorn_first:
        cls_targets, patch_targets = sinkhorn_targets(joined_teacher_outputs(teachers), hp)
        targets = list(zip(cls_targets.split([tt.cls_logits.shape[0] for tt in teachers]),
                           patch_targets.split([tt.patch_logits.shape[0] for tt in teachers]), strict=True))
    parts, used = [], []
    for i, micro in enumerate(batches):
        last = i == n - 1
        with _gradient_sync(t.student, sync=last):
            with amp:  # the DDP / FSDP wrapper runs the student
                out = forward_losses(model, micro, hp, cfg, student=t.student, health=health and last,
                                     teacher=teachers[i], targets=targets[i])
            t.scaler.scale(out.losses.total / n if n > 1 else out.losses.total).backward()
        parts.append(out.losses)
        # What the centres need (cls logits, patch sum and count); the patch logits are let go early.
        used.append(out.teacher if n == 1 else out.teacher._replace(patch_logits=out.teacher.patch_logits[:0]))
    stats = out.health
    losses = parts[0] if n == 1 else IBOTLoss(*(
        None if field[0] is None else torch.stack([x.detach() for x in field]).mean() for field in zip(*parts)))
    teacher = joined_teacher_outputs(used)
    if cfg.loss.centering == "center":
        model.update_centers(teacher, all_reduce_sum)  # after the loss used the previous centres
    t.scaler.unscale_(t.optimizer)
    if hp.freeze_backbone:  # before clipping: the frozen backbone's gradients neither count nor apply
        drop_backbone_gradients_(model)
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
