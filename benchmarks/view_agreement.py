"""How much two augmented views of one image agree in an untrained ViT's cls token: the number that decides whether
the cls term of self-distillation can teach (docs/learning.md, "Why the cls term taught nothing").

    python -m ibot_benchmarks.view_agreement --config engine/configs/demo_cpu.yaml
    python -m ibot_benchmarks.view_agreement --config launch/configs/digits.yaml --images 192

For `--images` training images of the config's data, it draws each image's views with the config's augmentation
(`data.*`, and variants with parts of the photometric recipe turned off or larger crops), runs the config's ViT at
random initialisation without LayerScale (random features), and prints the correlation over the batch of the
image-dependent part (the batch mean removed) of the L2-normalised cls tokens of global view 1 and global view 2,
and of a local view and global view 1; the same for the raw pixels of the two global views. A linearised step of the
cls loss lets the image-dependent part of the teacher's targets grow only when this agreement beats
teacher_temp / student_temp (0.4 in the official recipe, 0.1 in small_data.yaml). Seconds on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from ibot_engine.config import load_config
from ibot_engine.data.cpu_aug import MultiCropTransform
from ibot_engine.data.normalise import normalise
from ibot_engine.eval.datasets import build_eval_dataset, default_specs
from ibot_engine.model.ibot import IBOTNetwork

# name -> data config changes
VARIANTS = {
    "as configured": {},
    "no colour jitter": {"color_jitter_prob": 0.0},
    "no solarize": {"solarize_prob": 0.0},
    "no blur": {"blur_prob": (0.0, 0.0, 0.0)},
    "crops and flips only": {"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "solarize_prob": 0.0,
                             "blur_prob": (0.0, 0.0, 0.0)},
}


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation over rows of the row-centred (batch mean removed) features `a` and `b` [N, D]."""
    a, b = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    train_spec, _ = default_specs(cfg, cfg.eval.train or None, cfg.eval.val or None)
    dataset = build_eval_dataset(train_spec, cfg)
    images = [dataset[i][0] for i in range(min(args.images, len(dataset)))]
    torch.manual_seed(args.seed)
    network = IBOTNetwork(dataclasses.replace(cfg.model, layerscale=0.0), student=False).eval()

    def cls_tokens(views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(network.backbone(normalise(torch.stack(views)))[:, 0], dim=-1)

    g = cfg.data.num_global
    print(f"{len(images)} images of {train_spec}, {cfg.model.arch}/{cfg.model.patch_size} at "
          f"{cfg.data.global_size} / {cfg.data.local_size} px, untrained, no LayerScale")
    print(f"{'augmentation':24s} global-global  local-global  pixels global-global")
    for name, changes in VARIANTS.items():
        views = [MultiCropTransform(dataclasses.replace(cfg.data, **changes))(image, seed=args.seed * 100003 + i)
                 for i, image in enumerate(images)]
        first, second = cls_tokens([v[0] for v in views]), cls_tokens([v[1] for v in views])
        local = cls_tokens([v[g] for v in views]) if cfg.data.num_local else None
        pixels = [normalise(torch.stack([v[k] for v in views])).flatten(1) for k in (0, 1)]
        print(f"{name:24s} {agreement(first, second):13.3f}  "
              f"{agreement(local, first) if local is not None else float('nan'):12.3f}  "
              f"{agreement(*pixels):21.3f}")


if __name__ == "__main__":
    main()
