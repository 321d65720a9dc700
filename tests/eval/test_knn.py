"""Weighted k-NN (DINO's eval_knn) on features of known structure, and cls-token feature extraction."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibot_engine.data.synthetic import ShapesDataset
from ibot_engine.eval.features import extract_features
from ibot_engine.eval.knn import format_knn, weighted_knn


def _clusters(num_classes: int, per_class: int, dim: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(feats, dim=1), labels


def test_separated_clusters_are_classified_perfectly() -> None:
    train_x, train_y = _clusters(10, 30, 32, noise=0.05, seed=1)
    test_x, test_y = _clusters(10, 10, 32, noise=0.05, seed=2)
    result = weighted_knn(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    assert result == {"top1": 100.0, "top5": 100.0}


def test_random_labels_give_chance_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    train_x = F.normalize(torch.randn(2000, 16, generator=g), dim=1)
    test_x = F.normalize(torch.randn(2000, 16, generator=g), dim=1)
    train_y = torch.randint(0, 10, (2000,), generator=g)
    test_y = torch.randint(0, 10, (2000,), generator=g)
    result = weighted_knn(train_x, train_y, test_x, test_y, num_classes=10)
    assert abs(result["top1"] - 10.0) < 3.0
    assert abs(result["top5"] - 50.0) < 5.0


def test_k_matters_when_the_nearest_neighbour_is_an_outlier() -> None:
    # Each test point sits next to one mislabelled training point, with 20 correct points a bit further
    # away: k=1 follows the outlier, k=20 outvotes it despite the exponential weights.
    dim = 8
    centres = torch.eye(dim)[:2]
    test_x = centres.clone()
    test_y = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    train_x, train_y = [], []
    for c in range(2):
        train_x.append(F.normalize(centres[c] + 0.01 * torch.randn(dim, generator=g), dim=0)[None])
        train_y.append(torch.tensor([1 - c]))  # the outlier, nearly identical to the test point
        train_x.append(F.normalize(centres[c] + 0.15 * torch.randn(20, dim, generator=g), dim=1))
        train_y.append(torch.full((20,), c))
    train_x, train_y = torch.cat(train_x), torch.cat(train_y)
    assert weighted_knn(train_x, train_y, test_x, test_y, k=1)["top1"] == 0.0
    assert weighted_knn(train_x, train_y, test_x, test_y, k=20)["top1"] == 100.0


def test_chunking_does_not_change_the_result() -> None:
    train_x, train_y = _clusters(7, 20, 16, noise=0.6, seed=1)
    test_x, test_y = _clusters(7, 15, 16, noise=0.6, seed=2)
    whole = weighted_knn(train_x, train_y, test_x, test_y, chunk_size=1000)
    assert weighted_knn(train_x, train_y, test_x, test_y, chunk_size=7) == whole
    assert 0.0 < whole["top1"] <= whole["top5"] <= 100.0


def test_format_is_the_parsed_summary_line() -> None:
    assert format_knn({"top1": 87.26, "top5": 98.14}) == "k-NN top-1: 87.3%  top-5: 98.1%"
    assert format_knn({"top1": 100.0, "top5": 100.0}) == "k-NN top-1: 100.0%  top-5: 100.0%"


class _TinyBackbone(nn.Module):
    """Patchify + linear: tokens [B, 1 + N, D] with a cls token from the mean patch."""

    def __init__(self, dim: int = 12, patch: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.embed(images).flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)


def test_extract_features_from_a_dataset() -> None:
    torch.manual_seed(0)
    backbone = _TinyBackbone()
    backbone.train()
    dataset = ShapesDataset(size=23, image_size=40)
    feats, labels = extract_features(backbone, dataset, image_size=32, batch_size=8, device="cpu")
    assert feats.shape == (23, 12) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(23))
    assert labels.tolist() == [dataset[i][1] for i in range(23)]
    assert backbone.training  # restored after evaluation


def test_extract_features_from_ready_batches() -> None:
    backbone = _TinyBackbone()
    batches = [
        (torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])),
        (torch.randn(2, 3, 16, 16), torch.tensor([4, 5])),
    ]
    feats, labels = extract_features(backbone, batches, image_size=16, batch_size=4)
    assert feats.shape == (6, 12)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    with torch.no_grad():
        expected = F.normalize(backbone(batches[0][0])[:, 0], dim=1)
    torch.testing.assert_close(feats[:4], expected)
