"""iBOT pretraining in a plain PyTorch loop built from the engine's public pieces (one process, any device).

    python launch/examples/ibot_pytorch.py                           # ViT-tiny on the built-in demo data
    python launch/examples/ibot_pytorch.py --config launch/configs/vit_s16.yaml data.path=/data/in1k/train

Each step: scheduled hyperparameters -> teacher and student forward -> iBOT loss -> backward -> centres -> gradient
clipping -> AdamW -> teacher EMA. It computes what `ibot train` computes (tested equal, step for step); `ibot train`
adds checkpoints and resume, metrics files, DDP, non-finite loss checks and fp16 loss scaling. Edit freely.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from safetensors.torch import save_file

from ibot_engine.config import load_config
from ibot_engine.configs import DEMO_CONFIG
from ibot_engine.data.batch import MultiCropCollate
from ibot_engine.data.cpu_aug import MultiCropTransform
from ibot_engine.data.epoch_loader import EpochKeySampler
from ibot_engine.data.sources import MultiCropDataset, build_dataset
from ibot_engine.model.ibot import IBOT
from ibot_engine.objective import ibot_loss, koleo_loss
from ibot_engine.precision import autocast_dtype
from ibot_engine.train.optim import apply_hyperparams, build_optimizer, clip_gradients_, last_layer_params
from ibot_engine.train.schedules import hyperparams_at, total_steps_for
from ibot_kernels import ema_update_


def main() -> None:
    parser = argparse.ArgumentParser(description="iBOT in a plain PyTorch loop")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="YAML preset (default: the CPU demo; '' for none)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = load_config(args.config or None, ["run.dir=runs/ibot_pytorch", *args.overrides])
    if cfg.loss.centering != "center" or cfg.precision == "fp16":
        raise SystemExit("this example does EMA centres and fp32/bf16; use `ibot train` for sinkhorn or fp16")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = autocast_dtype(cfg.precision, device)  # bf16 on GPU, fp32 on CPU by default
    torch.manual_seed(cfg.train.seed)

    # Data: multi-crop views and block masks (the masking collate). The sampler yields (epoch, batch, index) keys,
    # which seed each sample's views and masks; one pass over the loader is one epoch.
    dataset, seed, grid = build_dataset(cfg.data), cfg.train.seed, cfg.data.global_size // cfg.model.patch_size
    loader = torch.utils.data.DataLoader(
        MultiCropDataset(dataset, MultiCropTransform(cfg.data), seed),
        sampler=EpochKeySampler(len(dataset), cfg.train.batch_size, seed=seed),
        batch_size=cfg.train.batch_size, drop_last=True, num_workers=cfg.data.num_workers,
        collate_fn=MultiCropCollate(cfg.mask, num_global=cfg.data.num_global, local_size=cfg.data.local_size,
                                    grid=(grid, grid), seed=seed, rank=0),
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG (drop-path) to the model
    )

    # Model: student, EMA teacher (a copy of the student at init) and the two centres; AdamW with decay groups.
    model = IBOT(cfg.model, cfg.loss).to(device)
    optimizer = build_optimizer(model.student, cfg.optim, device)
    teacher_params, student_params = model.ema_pairs()
    params = [p for p in model.student.parameters() if p.requires_grad]
    steps_per_epoch = len(loader)
    total_steps = total_steps_for(cfg, steps_per_epoch)

    model.train()  # the teacher stays in eval mode
    step = 0
    for epoch in itertools.count():
        if step == total_steps:
            break
        loader.sampler.set_epoch(epoch)
        for batch in itertools.islice(loader, total_steps - step):
            batch = batch.to(device)
            hp = hyperparams_at(step, cfg, total_steps, steps_per_epoch, world_size=1)  # pure function of the step
            apply_hyperparams(optimizer, hp.lr, hp.weight_decay)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                teacher = model.teacher_forward(batch.global_crops, batch.mask_indices)  # no grad, unmasked crops
                student = model.student(batch.global_crops, batch.mask_indices, batch.masks, batch.local_crops)
                losses = ibot_loss(
                    student.cls_logits, teacher.cls_logits, student.patch_logits, teacher.patch_logits, batch.masks,
                    model.cls_center, model.patch_center, hp.teacher_temp, hp.patch_teacher_temp,
                    cfg.loss.student_temp, num_global=cfg.data.num_global,
                    lambda_cls=cfg.loss.lambda_cls, lambda_patch=cfg.loss.lambda_patch,
                )
                loss = losses.total
                if cfg.loss.koleo_weight > 0:  # DINOv2's KoLeo on the student's global cls tokens
                    loss = loss + cfg.loss.koleo_weight * koleo_loss(student.cls_tokens, cfg.data.num_global)
            loss.backward()
            model.update_centers(teacher)  # EMA of the centres, after the loss used the old ones
            grad_norm = clip_gradients_(params, cfg.optim.clip_grad, cfg.optim.clip_mode)
            if hp.freeze_last_layer:
                for p in last_layer_params(optimizer):
                    p.grad = None  # the head's last layer is frozen during its first epochs
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # teacher <- m teacher + (1 - m) student, outside autograd
                ema_update_(teacher_params, student_params, hp.momentum)
            step += 1
            if step % cfg.train.log_every == 0 or step == total_steps:  # .item() waits for the device: log steps only
                print(f"step {step}/{total_steps} loss {loss.item():.6f} cls {losses.cls.item():.6f} "
                      f"patch {losses.patch.item():.6f} grad_norm {grad_norm.item():.4f} lr {hp.lr:.3e}", flush=True)

    out = Path(cfg.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out / "ibot_model.safetensors")  # student.*, teacher.*, cls_center, patch_center
    print(f"saved {out / 'ibot_model.safetensors'}")


if __name__ == "__main__":
    main()
