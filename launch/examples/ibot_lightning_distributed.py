"""iBOT pretraining with PyTorch Lightning on several devices or nodes (DDP).

    pip install -e ".[lightning]"
    python launch/examples/ibot_lightning_distributed.py --devices 8 --config launch/configs/vit_s16.yaml \
        data.path=/data/in1k/train                                      # Lightning starts one process per GPU
    torchrun --nproc-per-node 8 launch/examples/ibot_lightning_distributed.py --devices 8 ...   # also works
    python launch/examples/ibot_lightning_distributed.py --accelerator cpu --devices 2      # CPU, gloo
    srun python launch/examples/ibot_lightning_distributed.py --devices 8 --nodes 4 ...     # SLURM, read by Lightning

Distributed sampling is ours: each rank takes its slice of every global batch (`IBOTDataModule`, whose sampler is a
`DistributedSampler`), so rank r sees the same images, views and masks as rank r of `torchrun -m ibot_engine train`.
`train.batch_size` is per device and the peak lr scales with the total batch (lr * batch * devices * nodes / 256).
The centres are all-reduced over ranks every step. No SyncBatchNorm: a ViT has no batch norm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import save_file

from ibot_engine.config import load_config
from ibot_engine.configs import DEMO_CONFIG
from ibot_engine.integrations.lightning import IBOTDataModule, IBOTLightningModule


def main() -> None:
    parser = argparse.ArgumentParser(description="iBOT with PyTorch Lightning, DDP")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="YAML preset (default: the CPU demo; '' for none)")
    parser.add_argument("--accelerator", default="auto", help="gpu, cpu or auto")
    parser.add_argument("--devices", type=int, default=2, help="processes per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on GPU, 32-true)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = load_config(args.config or None, ["run.dir=runs/ibot_lightning_ddp", *args.overrides])
    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")

    module = IBOTLightningModule(cfg)  # seeded by train.seed, as `ibot train`: same init on every rank
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.nodes,
        # Our loop's DDP settings: the centres and other buffers stay in step by all-reduce, not by broadcast.
        strategy=DDPStrategy(broadcast_buffers=False),
        precision=precision,
        max_epochs=-1,  # the module stops at the end of its schedules (train.steps, or train.epochs of the data)
        log_every_n_steps=cfg.train.log_every,
        logger=CSVLogger(cfg.run.dir, name="lightning"),  # losses are means over all ranks
        default_root_dir=cfg.run.dir,
    )
    trainer.fit(module, datamodule=IBOTDataModule(cfg))
    if trainer.is_global_zero:
        path = Path(cfg.run.dir) / "ibot_model.safetensors"
        save_file(module.model.state_dict(), path)  # student.*, teacher.*, cls_center, patch_center
        print(f"saved {path}")


if __name__ == "__main__":
    main()
