"""Weighted k-NN evaluation of frozen backbone features, as in DINO's `eval_knn.py` (Caron et al., 2021).

Features are the backbone's cls token, L2-normalised (features.py extracts them). Each test image votes with its k
most cosine-similar training images, each vote weighted by exp(similarity / T) (k = 20, T = 0.07 by default); top-1
and top-5 accuracies are percentages. `KnnEvaluator` is the same k-NN inside training (`eval.knn_every`); the keys it
logs to metrics.jsonl (each `_top1` and `_top5`):

* `knn_*`: the teacher, features `eval.features` (default cls); `knn_clspatch_*`: the teacher's cls+patch features,
  from the same forward pass.
* At step 0 of a fresh run, once (`KnnEvaluator.baselines`), what the teacher must beat: `knn_random_*` and
  `knn_random_clspatch_*`, random features (the run's architecture at its random initialisation, seeded by
  train.seed, without LayerScale: untrained features that already separate images, where LayerScale 1e-5 makes every
  image's feature nearly the same), and `knn_pixels_*`, the raw pixels (each image's pixel vector after the
  evaluation resize and normalisation, L2-normalised; skipped when the training split's vectors exceed
  `PIXELS_MAX_GIB`).

Shapes: `N` train images, `Q` test images, `D` feature dim, `C` classes, `k` neighbours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibot_engine.config import Config
from ibot_engine.distributed import DistEnv
from ibot_engine.eval.datasets import build_eval_dataset, default_specs
from ibot_engine.eval.features import split_features, teacher_backbone
from ibot_engine.precision import autocast_dtype

log = logging.getLogger(__name__)
PIXELS_MAX_GIB = 4.0  # raw-pixel baseline: most GiB of fp32 pixel vectors of the training split it holds


@torch.no_grad()
def weighted_knn(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> dict[str, float]:
    """DINO's weighted k-NN classifier on L2-normalised features.

    Each test row takes its `k` nearest training rows by cosine similarity (dot product of unit vectors);
    neighbour j adds exp(sim_j / temperature) to the score of its class; the classes ranked by score give
    top-1 and top-5. Test rows are processed `chunk_size` at a time, so memory is O(chunk_size * N).

    Args:
        train_feats: [N, D], unit norm.
        train_labels: [N] int.
        test_feats: [Q, D], unit norm.
        test_labels: [Q] int.
        k: neighbours per test row (capped at N).
        temperature: T of the vote weights exp(sim / T).
        num_classes: C; defaults to 1 + the largest label seen.
        chunk_size: test rows per similarity matmul.

    Returns:
        `{"top1": percent, "top5": percent}`; top-5 is top-C when there are fewer than 5 classes.
    """
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if test_feats.shape[0] == 0:
        raise ValueError("no test features")
    train_feats = train_feats.float()
    test_feats = test_feats.float().to(train_feats.device)
    train_labels = train_labels.long().to(train_feats.device)
    test_labels = test_labels.long().to(train_feats.device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    top_n = min(5, num_classes)

    correct1 = correct5 = 0
    for start in range(0, test_feats.shape[0], chunk_size):
        sim_QN = test_feats[start : start + chunk_size] @ train_feats.T
        sim_Qk, idx_Qk = sim_QN.topk(k, dim=1)
        weights_Qk = (sim_Qk / temperature).exp()
        votes_QC = torch.zeros(sim_Qk.shape[0], num_classes, device=sim_QN.device)
        votes_QC.scatter_add_(1, train_labels[idx_Qk], weights_Qk)
        # exp(sim / T) <= exp(1 / 0.07) ~ 1.6e6: no overflow in fp32 for unit vectors and T >= ~0.012.
        pred_Qn = votes_QC.topk(top_n, dim=1).indices
        hit_Qn = pred_Qn == test_labels[start : start + chunk_size, None]
        correct1 += int(hit_Qn[:, 0].sum())
        correct5 += int(hit_Qn.any(dim=1).sum())
    total = test_feats.shape[0]
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def format_knn(result: dict[str, float]) -> str:
    """The one-line summary scripts parse: `k-NN top-1: 87.3%  top-5: 98.1%`."""
    return f"k-NN top-1: {result['top1']:.1f}%  top-5: {result['top5']:.1f}%"


def knn_eval(backbone: torch.nn.Module, cfg: Config, train_spec: str, val_spec: str, *, k: int = 20,
             temperature: float = 0.07, batch_size: int = 128, device: torch.device | None = None,
             features: str = "cls", precision: str | None = None, num_workers: int = 0) -> dict[str, Any]:
    """k-NN of `backbone` features: `train_spec` is the memory, `val_spec` is classified. `precision` defaults to
    the config's."""
    device = device or next(backbone.parameters()).device
    datasets = {"train": build_eval_dataset(train_spec, cfg), "val": build_eval_dataset(val_spec, cfg)}
    feats = split_features(backbone, datasets, image_size=cfg.data.global_size, batch_size=batch_size, device=device,
                           amp=autocast_dtype(precision or cfg.precision, device), features=features,
                           num_workers=num_workers)
    (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
    # The similarity matmuls run where the model does (GPU for ImageNet-sized sets), chunked over val rows.
    result = weighted_knn(train_x.to(device), train_y, val_x, val_y, k=k, temperature=temperature)
    return {**result, "k": k, "temperature": temperature, "features": features, "train": train_spec,
            "val": val_spec, "num_train": len(train_y), "num_val": len(val_y)}


@contextlib.contextmanager
def _unsharded_root(network: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2 the teacher network is the root unit and owns the backbone's embeddings and final norm (each block
    is its own unit and gathers itself in its forward): gather the root's parameters around a backbone-only pass."""
    unshard = getattr(network, "unshard", None)  # FSDPModule
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        network.reshard()


class _Pixels(nn.Module):
    """A stand-in backbone whose only token is the image itself, flattened: its "cls features" are the raw pixels."""

    def forward(self, images_BCHW: Tensor) -> Tensor:
        return images_BCHW.flatten(1)[:, None]


def _view(raw_ND: Tensor, features: str) -> Tensor:
    """The L2-normalised `features` (cls or cls+patch) of unnormalised cls+patch rows [N, 2D]."""
    return F.normalize(raw_ND if features == "cls+patch" else raw_ND[:, : raw_ND.shape[1] // 2], dim=-1)


class KnnEvaluator:
    """k-NN of the teacher during training (`eval.knn_every`): datasets built once, at the start of the run, so a
    bad `eval.train` / `eval.val` fails before the first step."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        train_spec, val_spec = default_specs(cfg, cfg.eval.train or None, cfg.eval.val or None)
        self.datasets = {"train": build_eval_dataset(train_spec, cfg), "val": build_eval_dataset(val_spec, cfg)}

    def __call__(self, teacher: torch.nn.Module, env: DistEnv) -> dict[str, float]:
        """`knn_top1`, `knn_top5` (`eval.features`) and `knn_clspatch_top1`, `knn_clspatch_top5` (%) of the teacher's
        backbone; every rank takes part (collectives) and gets the result."""
        with _unsharded_root(teacher):
            return self._knn(teacher.backbone, env, "knn")

    def baselines(self, env: DistEnv) -> dict[str, float]:
        """`knn_random_*`, `knn_random_clspatch_*` and `knn_pixels_*` (top-1 / top-5, %): the k-NN of random features
        and of the raw pixels (module docstring); every rank takes part. Draws nothing from the global RNG."""
        plain = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, layerscale=0.0))
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            random_backbone = teacher_backbone(plain, None, env.device)  # seeds the RNG with train.seed
        result = self._knn(random_backbone, env, "knn_random")
        del random_backbone
        size, num_train = self.cfg.data.global_size, len(self.datasets["train"])  # type: ignore[arg-type]
        gib = num_train * 3 * size * size * 4 / 2**30
        if gib > PIXELS_MAX_GIB:
            log.info("k-NN of the raw pixels skipped: %d training images of 3 x %d x %d floats are %.1f GiB (more "
                     "than %.0f)", num_train, size, size, gib, PIXELS_MAX_GIB)
            return result
        return {**result, **self._knn(_Pixels(), env, "knn_pixels", pixels=True)}

    def _knn(self, backbone: torch.nn.Module, env: DistEnv, prefix: str, pixels: bool = False) -> dict[str, float]:
        """`{prefix}_top1/5` (`eval.features`) and `{prefix}_clspatch_top1/5` (cls+patch) of `backbone`, from one
        extraction; `pixels`: `backbone` is `_Pixels`, whose one k-NN is `{prefix}_top1/5`."""
        c = self.cfg.eval
        # The DataLoader draws its base seed from the global RNG: keep training's RNG stream as it was.
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            # One forward per image: the pixels L2-normalised, or the unnormalised cls and mean patch tokens, which
            # `_view` normalises into each kind of feature.
            feats = split_features(backbone, self.datasets, image_size=self.cfg.data.global_size,
                                   batch_size=c.batch_size, device=env.device,
                                   amp=None if pixels else autocast_dtype(self.cfg.precision, env.device),
                                   features="cls" if pixels else "cls+patch", normalize=pixels,
                                   num_workers=c.num_workers)
        (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
        kinds = {prefix: None} if pixels else {prefix: c.features, f"{prefix}_clspatch": "cls+patch"}
        results: dict[str | None, dict[str, float]] = {}
        out = {}
        for name, features in kinds.items():
            if features not in results:  # eval.features=cls+patch: one k-NN for both keys
                train_v, val_v = (x if features is None else _view(x, features) for x in (train_x, val_x))
                results[features] = weighted_knn(train_v.to(env.device), train_y, val_v, val_y, k=c.k,
                                                 temperature=c.temperature)
            out.update({f"{name}_{top}": results[features][top] for top in ("top1", "top5")})
        return out
