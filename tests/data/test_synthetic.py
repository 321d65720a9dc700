"""The built-in datasets (shapes, patterns): deterministic, split-disjoint, balanced, right size and mode, fast."""

import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibot_engine.data.synthetic import PatternsDataset, ShapesDataset, builtin_dataset
from ibot_engine.eval.knn import weighted_knn


def _pixels(dataset: torch.utils.data.Dataset, index: int) -> np.ndarray:
    return np.asarray(dataset[index][0])


@pytest.mark.parametrize("cls", [ShapesDataset, PatternsDataset])
def test_images_are_rgb_of_the_requested_size(cls) -> None:
    for image_size in (32, 64, 96):
        dataset = cls(size=10, image_size=image_size)
        image, label = dataset[3]
        assert image.mode == "RGB"
        assert image.size == (image_size, image_size)
        assert isinstance(label, int)


@pytest.mark.parametrize("cls", [ShapesDataset, PatternsDataset])
def test_deterministic_per_seed_split_and_index(cls) -> None:
    a, b = cls(size=20, seed=3), cls(size=20, seed=3)
    for i in (0, 7, 19):
        np.testing.assert_array_equal(_pixels(a, i), _pixels(b, i))
        assert a[i][1] == b[i][1]
    # Reading out of order gives the same image: nothing depends on access history.
    np.testing.assert_array_equal(_pixels(a, 7), _pixels(cls(size=20, seed=3), 7))


@pytest.mark.parametrize("cls", [ShapesDataset, PatternsDataset])
def test_seeds_and_splits_give_different_images(cls) -> None:
    train = cls(size=50, seed=0, split="train")
    val = cls(size=50, seed=0, split="val")
    other_seed = cls(size=50, seed=1, split="train")
    for i in range(50):
        assert not np.array_equal(_pixels(train, i), _pixels(val, i))
        assert not np.array_equal(_pixels(train, i), _pixels(other_seed, i))


@pytest.mark.parametrize("cls", [ShapesDataset, PatternsDataset])
def test_labels_are_balanced_over_the_classes(cls) -> None:
    dataset = cls(size=103)
    assert len(dataset) == 103
    assert len(dataset.classes) == len(set(dataset.classes)) >= 8
    counts = Counter(dataset[i][1] for i in range(len(dataset)))
    assert set(counts) == set(range(len(dataset.classes)))
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("cls", [ShapesDataset, PatternsDataset])
def test_colour_does_not_predict_the_label(cls) -> None:
    # If the mean hue identified the class, the demo's k-NN would not need structure features at all. (Mean
    # brightness does depend on the class for patterns, through the dark area of each pattern: that is structure.)
    def colour_features(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        means = torch.tensor(np.stack([_pixels(dataset, i).reshape(-1, 3).mean(0) for i in range(len(dataset))]))
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        chroma = means / means.sum(1, keepdim=True).clamp(min=1) - 1 / 3
        return F.normalize(chroma, dim=1), labels

    result = weighted_knn(*colour_features(cls(300)), *colour_features(cls(150, split="val")))
    assert result["top1"] < 27.0  # chance is 10% (shapes) or 12.5% (patterns)


@pytest.mark.parametrize("cls", [ShapesDataset, PatternsDataset])
def test_bad_arguments_raise(cls) -> None:
    with pytest.raises(ValueError, match="split"):
        cls(split="test")
    with pytest.raises(IndexError):
        cls(size=5)[5]


@pytest.mark.parametrize("cls", [ShapesDataset, PatternsDataset])
def test_generation_is_fast(cls) -> None:
    dataset = cls(size=200)
    dataset[0]
    start = time.perf_counter()
    for i in range(200):
        dataset[i]
    # ~1 ms per 64 px image on one core; the bound is loose for loaded CI machines.
    assert (time.perf_counter() - start) / 200 < 0.02


def test_builtin_dataset_specs() -> None:
    assert isinstance(builtin_dataset("builtin:patterns", 10), PatternsDataset)
    val = builtin_dataset("builtin:shapes:val", 10)
    assert isinstance(val, ShapesDataset) and val.split == "val"
    with pytest.raises(ValueError, match="unknown built-in dataset 'builtin:cats'"):
        builtin_dataset("builtin:cats", 10)
