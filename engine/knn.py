"""Weighted k-NN evaluation of frozen backbone features, as in DINO's `eval_knn.py` (Caron et al., 2021).

Features are the backbone's cls token, L2-normalised. Each test image votes with its k most cosine-similar
training images, each vote weighted by exp(similarity / T) (k = 20, T = 0.07 by default); top-1 and top-5
accuracies are percentages.

Shapes: `N` train images, `Q` test images, `D` feature dim, `C` classes, `k` neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor, nn
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES = ("cls", "cls+patch")


def eval_transform(image_size: int) -> v2.Compose:
    """PIL image -> normalised float tensor [3, image_size, image_size] (resize only, no crop)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _Transformed(torch.utils.data.Dataset):
    """Applies `transform` to the image of each `(image, label)` pair of `dataset`."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: v2.Compose) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    data: torch.utils.data.Dataset | Iterable[tuple[Tensor, Tensor]],
    *,
    image_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    features: str = "cls",
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cls-token features of every image, L2-normalised.

    Args:
        backbone: `forward(images [B, 3, H, W]) -> tokens [B, 1 + N, D]` (final norm applied); token 0 is cls.
        data: a dataset of `(PIL image, label)` pairs, which gets the evaluation transform (resize to
            `image_size`, ImageNet normalisation), or an iterable of ready `(images [B, 3, H, W], labels [B])`
            batches, used as is.
        image_size: side the images are resized to (datasets only).
        batch_size: images per forward pass (datasets only).
        device: where the backbone runs.
        num_workers: DataLoader workers for datasets.
        autocast_dtype: e.g. torch.bfloat16 to run the forward under autocast on GPU; features are fp32 anyway.
        features: `cls` (the cls token, [N, D]) or `cls+patch` (cls token and mean patch token concatenated,
            [N, 2D]).
        normalize: L2-normalise each feature row (k-NN); the linear probe standardises raw features instead.

    Returns:
        `(features [N, D or 2D] fp32 on the CPU, unit L2 norm if normalize, labels [N] int64 on the CPU)`, in
        data order.
    """
    if features not in FEATURES:
        raise ValueError(f"features={features!r}: use one of {list(FEATURES)}")
    if isinstance(data, torch.utils.data.Dataset):
        data = torch.utils.data.DataLoader(
            _Transformed(data, eval_transform(image_size)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
        )
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    out, labels = [], []
    try:
        for images, batch_labels in data:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                tokens_BTD = backbone(images.to(device, non_blocking=True))
            feats_BD = tokens_BTD[:, 0].float()
            if features == "cls+patch":
                feats_BD = torch.cat([feats_BD, tokens_BTD[:, 1:].float().mean(1)], dim=-1)
            out.append((F.normalize(feats_BD, dim=-1) if normalize else feats_BD).cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out), torch.cat(labels)


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
