"""PyTorch Lightning entry point: our model, objective, schedules and EMA as a `LightningModule`.

Optional: needs `pip install 'ibot-engine[lightning]'`. Nothing else in `engine` imports this module, so the rest
of the package never needs Lightning.

    cfg = load_config("launch/configs/vit_s16.yaml", ["data.path=/data/in1k/train"])
    module = IBOTLightningModule(cfg)  # seeded by train.seed, like `ibot train`
    trainer = L.Trainer(max_epochs=-1, precision="bf16-mixed", strategy=DDPStrategy(broadcast_buffers=False))
    trainer.fit(module, datamodule=IBOTDataModule(cfg))  # stops at the end of the config's schedules

One optimizer step is exactly our loop's `ibot_engine.train.step.train_step` (tested equal, single process and 2-rank
DDP): the hyperparameters of the step (`ibot_engine.train.schedules.hyperparams_at`, per step) go into the optimizer;
teacher and student forward and the objective (`ibot_engine.train.step.forward_losses`); backward; the centres are
updated with all-reduced teacher statistics (`on_after_backward`); gradients are clipped by our rule (`optim.clip_grad`,
`optim.clip_mode`) and the head's last layer dropped during its frozen epochs (`configure_gradient_clipping`); AdamW
steps; then the teacher EMA runs once, after the optimizer step (`optimizer_step`, `ibot_kernels.ema_update_`).

What comes from the config and what from the Trainer:
* The run length (`train.steps`, or `train.epochs` of the dataset) defines the schedules; the module stops the
  Trainer there (`max_steps` may stop it earlier). Gradient clipping is the config's: `Trainer(gradient_clip_val=...)`
  is refused. Gradient accumulation: `Trainer(accumulate_grad_batches=N)` with `train.accum_steps=N` (the config's
  value sets the global batch, hence the learning rate), exactly as our loop with EMA centres (they move once per
  optimizer step, by every micro-batch's teacher outputs); refused with Sinkhorn-Knopp targets, which need every
  micro-batch's teacher outputs before the first student pass (and so is `loss.center_init=first_batch`). The
  logged losses are each micro-batch's.
* `model.init_from` (released weights) is read when the module is built, as `ibot train` reads it; the freeze of
  the backbone and the first-batch centres follow our loop. Resuming is Lightning's (`ckpt_path`), which reads the
  file again before it replaces the weights.
* Precision is the Trainer's (`precision="bf16-mixed"`, `"16-mixed"`, `"32-true"`); `cfg.precision` is not read.
  The objective and the centres are fp32 in every mode. `train.compile` and `train.activation_checkpointing` are
  applied as in our loop (`ibot_engine.model.ibot.apply_train_options`); `train.deterministic` is the Trainer's
  (`Trainer(deterministic=True)`).
* No SyncBatchNorm: a ViT has no batch norm (LayerNorm normalises each token on its own), so `sync_batchnorm=True`
  changes nothing. The only cross-rank batch statistics of iBOT, the centres (or the Sinkhorn-Knopp sums), are
  all-reduced here explicitly.
* Data: `IBOTDataModule` gives each rank the same batches as our loop's data stream; its sampler shards by rank
  itself (it is a `DistributedSampler`, so Lightning does not replace it; `use_distributed_sampler` can stay on).
  Lightning does not skip the batches already seen when it resumes mid-epoch; our own loop does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

try:
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ibot_engine.integrations.lightning needs PyTorch Lightning: pip install 'ibot-engine[lightning]' "
        "(or pip install lightning)"
    ) from err

from ibot_engine.config import Config, config_from_dict, config_to_dict
from ibot_engine.data.batch import Batch
from ibot_engine.data.epoch_loader import build_train_loader
from ibot_engine.distributed import all_reduce_sum
from ibot_engine.model.ibot import IBOT, TeacherOutput, apply_train_options
from ibot_engine.train.continuation import load_released_, resolve_start
from ibot_engine.train.health import HEALTH_KEYS, NonFiniteLossError
from ibot_engine.train.optim import apply_hyperparams, build_optimizer, clip_gradients_, last_layer_params
from ibot_engine.train.schedules import Hyperparams, hyperparams_at, total_steps_for
from ibot_engine.train.step import drop_backbone_gradients_, forward_losses, init_centers_, joined_teacher_outputs
from ibot_kernels import ema_update_

__all__ = ["IBOTDataModule", "IBOTLightningModule"]


class IBOTLightningModule(L.LightningModule):
    """iBOT student + EMA teacher + centres (`self.model`, an `ibot_engine.model.ibot.IBOT`) trained by Lightning.

    Logs per step: `loss`, `loss_cls`, `loss_patch` (and `loss_koleo` with `loss.koleo_weight`; means over all
    ranks), `grad_norm` (before clipping), and every `Trainer(log_every_n_steps)` steps the scheduled `lr`,
    `weight_decay`, `momentum`, `teacher_temp`, `patch_teacher_temp` and the training-health metrics of
    `ibot_engine.train.health` (means over ranks). `training_step` returns the local loss, which Lightning
    backpropagates.

    Building the module seeds torch's global RNG with `train.seed` before the model's init, as `ibot train` does,
    so every rank starts from the same weights and the run repeats with the seed.
    """

    def __init__(self, cfg: Config | dict[str, Any]) -> None:
        super().__init__()
        cfg = config_from_dict(cfg) if isinstance(cfg, dict) else cfg
        # model.init_from: the model fields its file fixes, the effective freeze and centre rule (as `ibot train`).
        self.cfg, released = resolve_start(cfg)
        self.save_hyperparameters({"cfg": config_to_dict(self.cfg)})  # load_from_checkpoint rebuilds from the dict
        torch.manual_seed(self.cfg.train.seed)  # as our loop: the seed fixes the init, then drop-path draws follow
        self.model = IBOT(self.cfg.model, self.cfg.loss)
        if released is not None:
            load_released_(self.model, released, self.cfg)
        apply_train_options(self.model, self.cfg.train)  # before Lightning's DDP / FSDP wrap
        # Lightning's DDP strategy re-seeds each process when it starts (reset_seed, after seed_everything), which
        # would restart the stream the init has advanced; on_train_start puts it back, as our loop continues it.
        self._rng_after_init: Tensor | None = torch.get_rng_state()
        self.steps_per_epoch = 0  # set in on_train_start, from the Trainer's loader
        self.total_steps = 0
        self._hp: Hyperparams | None = None
        self._teacher: TeacherOutput | None = None
        self._window: list[TeacherOutput] = []  # the teacher outputs of this optimizer step's micro-batches
        self._last_micro = True
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] | None = None
        self._params: list[Tensor] = []
        self._nonfinite: Tensor | None = None

    # -- set-up ---------------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # lr and weight decay are set every step from the schedules (no Lightning LR scheduler).
        return build_optimizer(self.model.student, self.cfg.optim, self.device,
                               split_backbone=self.cfg.train.unfreeze_warmup_steps > 0)

    def on_fit_start(self) -> None:
        t = self.trainer
        if t.gradient_clip_val is not None:
            raise ValueError(
                f"Trainer(gradient_clip_val={t.gradient_clip_val}) is not used by IBOTLightningModule: set the "
                "config keys optim.clip_grad / optim.clip_mode instead"
            )
        if t.accumulate_grad_batches != self.cfg.train.accum_steps:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={t.accumulate_grad_batches}) differs from train.accum_steps="
                f"{self.cfg.train.accum_steps}: set both to the same value (the config's sets the global batch, "
                "hence the learning rate and the schedules)"
            )
        if t.accumulate_grad_batches > 1 and self.cfg.loss.centering == "center" and \
                self.cfg.loss.center_init == "first_batch":
            raise ValueError(
                "loss.center_init=first_batch with gradient accumulation needs every micro-batch's teacher outputs "
                "before the first student pass: use `ibot train` (train.accum_steps), loss.center_init=zero, or no "
                "accumulation"
            )
        if t.accumulate_grad_batches > 1 and self.cfg.loss.centering == "sinkhorn":
            raise ValueError(
                "loss.centering=sinkhorn with gradient accumulation needs every micro-batch's teacher outputs before "
                "the first student pass, which Lightning's per-batch training_step cannot see: use `ibot train` "
                "(train.accum_steps), loss.centering=center, or no accumulation"
            )

    def on_train_start(self) -> None:
        steps = self.trainer.num_training_batches
        if not math.isfinite(steps) or steps <= 0:
            raise ValueError(
                "IBOTLightningModule needs a finite per-epoch train loader (its length is the epoch of the "
                "schedules): use IBOTDataModule or ibot_engine.data.epoch_loader.build_train_loader"
            )
        self.steps_per_epoch = math.ceil(steps / self.trainer.accumulate_grad_batches)  # optimizer steps
        self.total_steps = total_steps_for(self.cfg, self.steps_per_epoch)
        if self.trainer.max_steps > self.total_steps:
            rank_zero_warn(f"Trainer(max_steps={self.trainer.max_steps}) is past the end of the schedules "
                           f"({self.total_steps} steps from the config); training stops at {self.total_steps}")
        if self._rng_after_init is not None and self.global_step == 0:  # a fresh run (a resumed one keeps its own)
            torch.set_rng_state(self._rng_after_init)
        self._rng_after_init = None
        self._ema_pairs = self.model.ema_pairs()  # after the move to the device: the tensors the EMA updates
        self._params = [p for p in self.model.student.parameters() if p.requires_grad]
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def hyperparams(self, step: int) -> Hyperparams:
        """The scheduled hyperparameters of optimizer step `step` (the same pure function our loop uses)."""
        return hyperparams_at(step, self.cfg, self.total_steps, self.steps_per_epoch, self.trainer.world_size)

    # -- one step, in the order Lightning calls the hooks -----------------------------------------------------------

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        hp = self._hp = self.hyperparams(self.global_step)  # global_step counts completed optimizer steps
        apply_hyperparams(optimizer, hp.lr, hp.weight_decay, hp.backbone_lr_factor)
        # The closure runs training_step, backward (+ on_after_backward) and configure_gradient_clipping.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        teacher_params, student_params = self._ema_pairs  # type: ignore[misc]
        with torch.no_grad():  # else the in-place update records autograd history into the teacher
            ema_update_(teacher_params, student_params, hp.momentum)  # the teacher EMA, after the optimizer step

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        hp = self._hp if self._hp is not None else self.hyperparams(self.global_step)
        log_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0  # the steps Lightning logs
        # With accumulation Lightning steps after every accumulate_grad_batches-th batch and after an epoch's last.
        self._last_micro = ((batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
                            or batch_idx + 1 == self.trainer.num_training_batches)
        teacher = None
        if hp.init_centers:  # step 0 of loss.center_init=first_batch: centres <- this batch's teacher means
            teacher = self.model.teacher_forward(batch.global_crops, batch.mask_indices)
            init_centers_(self.model, teacher)
        losses, self._teacher, health = forward_losses(self.model, batch, hp, self.cfg, health=log_step,
                                                       teacher=teacher)
        self._nonfinite |= ~torch.isfinite(losses.total.detach())  # read at checkpoint and at the end (no sync)
        # Means over ranks, one collective; device tensors, which Lightning reads back only when it logs.
        names = ["loss", "loss_cls", "loss_patch"]
        values = [losses.total, losses.cls, losses.patch]
        if losses.koleo is not None:
            names, values = [*names, "loss_koleo"], [*values, losses.koleo]
        if health is not None:  # training-health metrics (engine/train/health.py), on logging steps only
            names, values = [*names, *HEALTH_KEYS], [*values, *health.unbind(0)]
        means = all_reduce_sum(torch.stack(values).detach().float()) / self.trainer.world_size
        self.log_dict(dict(zip(names, means.unbind(0), strict=True)), on_step=True, on_epoch=False, prog_bar=False)
        if log_step:  # host floats
            self.log_dict({"lr": hp.lr, "weight_decay": hp.weight_decay, "momentum": hp.momentum,
                           "teacher_temp": hp.teacher_temp, "patch_teacher_temp": hp.patch_teacher_temp},
                          on_step=True, on_epoch=False)
        return losses.total

    def on_after_backward(self) -> None:
        # The centres move once per optimizer step, by the teacher outputs of all its micro-batches (gradient
        # accumulation: every micro-batch's loss used the centres from before the step). Patch logits are let go.
        if self.cfg.loss.centering == "center" and self._teacher is not None:
            self._window.append(self._teacher._replace(patch_logits=self._teacher.patch_logits[:0]))
            if self._last_micro:
                self.model.update_centers(joined_teacher_outputs(self._window), all_reduce_sum)
                self._window = []
        self._teacher = None

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        if self._hp is not None and self._hp.freeze_backbone:  # train.freeze_backbone_steps, as our loop
            drop_backbone_gradients_(self.model)
        grad_norm = clip_gradients_(self._params, self.cfg.optim.clip_grad, self.cfg.optim.clip_mode)
        self.log("grad_norm", grad_norm.float(), on_step=True, on_epoch=False)
        if self._hp is not None and self._hp.freeze_last_layer:
            for p in last_layer_params(optimizer):
                p.grad = None  # AdamW skips parameters without gradients: no update, no decay

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._hp = None
        if self.global_step >= self.total_steps:
            self.trainer.should_stop = True  # the end of the schedules

    # -- safety ---------------------------------------------------------------------------------------------------

    def _check_finite(self) -> None:
        if self._nonfinite is not None and bool(self._nonfinite):  # host sync: only at checkpoints and at the end
            raise NonFiniteLossError(
                f"non-finite loss at or before step {self.global_step}; stopping before a checkpoint of a non-finite "
                "state is written. Try precision='bf16-mixed' or '32-true', a lower optim.lr, or a longer warm-up."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_finite()

    def on_train_end(self) -> None:
        self._check_finite()


class IBOTDataModule(L.LightningDataModule):
    """Our multi-crop + masking pipeline as a per-epoch DataLoader for each rank (`build_train_loader`).

    Rank r of W gets the same batches as rank r of our own loop at world size W: same order, views and masks.
    """

    def __init__(self, cfg: Config | dict[str, Any]) -> None:
        super().__init__()
        self.cfg = config_from_dict(cfg) if isinstance(cfg, dict) else cfg

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        t = self.trainer
        assert t is not None, "IBOTDataModule.train_dataloader is called by a Trainer"
        return build_train_loader(self.cfg, rank=t.global_rank, world_size=t.world_size, device=t.strategy.root_device)
