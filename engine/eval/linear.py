"""Linear probe on frozen features: `ibot eval linear`.

The features of both splits are extracted once (as for k-NN, distributed over ranks under torchrun), standardised
with the training split's mean and standard deviation, and cached in memory. A linear classifier is trained per
learning rate of a sweep (SGD, momentum 0.9, cosine decay, zero init, cross-entropy, a few epochs), all of them in
the same pass over shuffled mini-batches. The learning rate is chosen on a held-out tenth of the training split,
never on the validation split, and the chosen classifier's validation top-1 / top-5 is reported.

Shapes: N training rows, Q validation rows, D feature dim, C classes, L learning rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ibot_engine.config import Config
from ibot_engine.eval.datasets import build_eval_dataset
from ibot_engine.eval.features import split_features
from ibot_engine.precision import autocast_dtype

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def _accuracy(logits_QC: Tensor, labels_Q: Tensor) -> tuple[float, float]:
    top_n = min(5, logits_QC.shape[1])
    hit = logits_QC.topk(top_n, dim=1).indices == labels_Q[:, None]
    return 100.0 * float(hit[:, 0].float().mean()), 100.0 * float(hit.any(1).float().mean())


def train_linear(train_x: Tensor, train_y: Tensor, num_classes: int, *, lrs: Sequence[float] = DEFAULT_LRS,
                 epochs: int = 10, batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0
                 ) -> tuple[Tensor, Tensor]:
    """One linear classifier per learning rate on features `train_x` [N, D]; returns weights [L, D, C], bias [L, C].

    The classifiers do not interact: each one's loss only reaches its own weights, so summing the losses trains
    them independently in one pass.
    """
    L, (N, D) = len(lrs), train_x.shape
    W = torch.zeros(L, D, num_classes, device=train_x.device, requires_grad=True)
    b = torch.zeros(L, num_classes, device=train_x.device, requires_grad=True)
    lr_L = torch.tensor(lrs, device=train_x.device, dtype=torch.float32)
    steps_per_epoch = max(1, -(-N // batch_size))
    total = epochs * steps_per_epoch
    momentum_W, momentum_b = torch.zeros_like(W), torch.zeros_like(b)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(N, generator=g).to(train_x.device)
        for start in range(0, N, batch_size):
            idx = order[start : start + batch_size]
            x_BD, y_B = train_x[idx], train_y[idx]
            logits_LBC = torch.einsum("bd,ldc->lbc", x_BD, W) + b[:, None]
            loss = F.cross_entropy(logits_LBC.flatten(0, 1), y_B.repeat(L), reduction="sum") / len(idx)
            gW, gb = torch.autograd.grad(loss, (W, b))
            scale = lr_L * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total)))  # cosine decay to 0
            with torch.no_grad():
                momentum_W.mul_(0.9).add_(gW + weight_decay * W)
                momentum_b.mul_(0.9).add_(gb)
                W.sub_(scale[:, None, None] * momentum_W)
                b.sub_(scale[:, None] * momentum_b)
            step += 1
    return W.detach(), b.detach()


@torch.no_grad()
def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *,
                 lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 10, batch_size: int = 256,
                 holdout: float = 0.1, num_classes: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Train probes on `train_*` for each lr, pick the lr by top-1 on a held-out part of `train_*`, report the
    picked probe's accuracy on `val_*` (percent)."""
    if train_x.shape[0] != train_y.shape[0] or val_x.shape[0] != val_y.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if not lrs:
        raise ValueError("the learning-rate sweep is empty")
    train_x, val_x = train_x.float(), val_x.float().to(train_x.device)
    train_y, val_y = train_y.long().to(train_x.device), val_y.long().to(train_x.device)
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed + 1)).to(train_x.device)
    num_hold = int(holdout * train_x.shape[0]) if train_x.shape[0] >= 20 else 0
    hold, fit = perm[:num_hold], perm[num_hold:]
    mean, std = train_x[fit].mean(0), train_x[fit].std(0).clamp(min=1e-6)
    standardise = lambda x: (x - mean) / std
    with torch.enable_grad():
        W, b = train_linear(standardise(train_x[fit]), train_y[fit], num_classes, lrs=lrs, epochs=epochs,
                            batch_size=batch_size, seed=seed)
    select_x, select_y = (train_x[hold], train_y[hold]) if num_hold else (train_x[fit], train_y[fit])
    select_logits = torch.einsum("bd,ldc->lbc", standardise(select_x), W) + b[:, None]
    select_top1 = [_accuracy(select_logits[i], select_y)[0] for i in range(len(lrs))]
    best = max(range(len(lrs)), key=lambda i: (select_top1[i], -i))  # ties: the smaller lr
    top1, top5 = _accuracy(standardise(val_x) @ W[best] + b[best], val_y)
    return {"top1": top1, "top5": top5, "lr": float(lrs[best]), "epochs": epochs,
            "holdout_top1_by_lr": {str(lr): acc for lr, acc in zip(lrs, select_top1)}}


def linear_eval(backbone: torch.nn.Module, cfg: Config, train_spec: str, val_spec: str, *, batch_size: int = 128,
                device: torch.device | None = None, features: str = "cls", precision: str | None = None,
                epochs: int = 10, lrs: Sequence[float] | None = None, num_workers: int = 0) -> dict[str, Any]:
    """Linear probe of `backbone` features: trained on `train_spec`, evaluated on `val_spec`."""
    device = device or next(backbone.parameters()).device
    datasets = {"train": build_eval_dataset(train_spec, cfg), "val": build_eval_dataset(val_spec, cfg)}
    feats = split_features(backbone, datasets, image_size=cfg.data.global_size, batch_size=batch_size, device=device,
                           amp=autocast_dtype(precision or cfg.precision, device), features=features,
                           normalize=False, num_workers=num_workers)
    (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
    result = linear_probe(train_x.to(device), train_y, val_x, val_y, lrs=lrs or DEFAULT_LRS, epochs=epochs,
                          seed=cfg.train.seed)
    return {**result, "features": features, "train": train_spec, "val": val_spec, "num_train": len(train_y),
            "num_val": len(val_y)}


def format_linear(result: dict[str, float]) -> str:
    """The one-line summary scripts parse: `linear top-1: 87.3%  top-5: 98.1%`."""
    return f"linear top-1: {result['top1']:.1f}%  top-5: {result['top5']:.1f}%"
