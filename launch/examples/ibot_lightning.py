"""iBOT pretraining with PyTorch Lightning on one device: the engine's `LightningModule` and `LightningDataModule`.

    pip install -e ".[lightning]"
    python launch/examples/ibot_lightning.py                          # ViT-tiny on the built-in demo data
    python launch/examples/ibot_lightning.py --config launch/configs/vit_s16.yaml data.path=/data/in1k/train

The model, objective, schedules, centres, clipping and teacher EMA are ours (`ibot_engine.integrations.lightning`); the
loop, precision, logging and checkpoints are Lightning's. Several GPUs: see ibot_lightning_distributed.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file

from ibot_engine.config import load_config
from ibot_engine.configs import DEMO_CONFIG
from ibot_engine.integrations.lightning import IBOTDataModule, IBOTLightningModule


def main() -> None:
    parser = argparse.ArgumentParser(description="iBOT with PyTorch Lightning, one device")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="YAML preset (default: the CPU demo; '' for none)")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on GPU, 32-true)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = load_config(args.config or None, ["run.dir=runs/ibot_lightning", *args.overrides])
    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")

    module = IBOTLightningModule(cfg)  # seeded by train.seed, as `ibot train`: same init on every rank
    trainer = L.Trainer(
        devices=1,
        precision=precision,
        max_epochs=-1,  # the module stops at the end of its schedules (train.steps, or train.epochs of the data)
        log_every_n_steps=cfg.train.log_every,
        logger=CSVLogger(cfg.run.dir, name="lightning"),  # loss, loss_cls, loss_patch, grad_norm, lr, ... per step
        default_root_dir=cfg.run.dir,
    )
    trainer.fit(module, datamodule=IBOTDataModule(cfg))
    if trainer.is_global_zero:
        path = Path(cfg.run.dir) / "ibot_model.safetensors"
        save_file(module.model.state_dict(), path)  # student.*, teacher.*, cls_center, patch_center
        print(f"saved {path}")


if __name__ == "__main__":
    main()
