"""`builtin:digits`: scikit-learn's scans as an image folder, read through the same folder and shard paths as any
data (`data.path`, `eval.*`, `ibot shards write`), written once and atomically, with one clear error without
scikit-learn."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import ibot_engine.data.digits as digits
from ibot_engine.config import load_config
from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.shards.write import write_shards
from ibot_engine.data.stream import build_data_stream
from ibot_engine.data.synthetic import builtin_dataset, builtin_folder
from ibot_engine.eval.datasets import build_eval_dataset

pytest.importorskip("sklearn")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IBOT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_digits_are_real_scans_in_a_class_folder_split_80_20(cache):
    from sklearn.datasets import load_digits

    train, val = builtin_dataset("builtin:digits", 0), builtin_dataset("builtin:digits:val", 0)
    assert isinstance(train, ImageFolderDataset) and len(train) == 1437 and len(val) == 360
    assert train.classes == [str(d) for d in range(10)] == val.classes
    train_ids = {p.stem for p, _ in train.samples}
    assert not train_ids & {p.stem for p, _ in val.samples}  # disjoint splits, 1,797 scans in all
    image, label = train[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    scan = load_digits()
    index = int(train.samples[0][0].stem)
    assert label == scan.target[index]
    # The 64 px image is the 8 x 8 scan, upscaled: pooled back to 8 x 8 it correlates with the scan.
    pooled = np.asarray(image.convert("L"), np.float32).reshape(8, 8, 8, 8).mean(axis=(1, 3))
    assert np.corrcoef(pooled.ravel(), scan.images[index].ravel())[0, 1] > 0.95
    assert builtin_folder("builtin:digits:val") == str(cache / "digits-v1" / "val")


def test_digits_are_written_once_and_reused(cache, monkeypatch):
    builtin_folder("builtin:digits")
    marker = cache / "digits-v1" / "complete"
    stamp = marker.stat().st_mtime_ns
    monkeypatch.setattr(digits, "_write", lambda root: pytest.fail("written again"))
    builtin_folder("builtin:digits:val")
    assert marker.stat().st_mtime_ns == stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_a_failed_write_leaves_no_half_dataset(cache, monkeypatch):
    def broken(root):
        (root / "train" / "0").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(digits, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        builtin_folder("builtin:digits")
    assert not (cache / "digits-v1").exists() and list(cache.iterdir()) == []


def test_without_scikit_learn_one_clear_error(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ValueError, match=r"builtin:digits needs scikit-learn.*ibot-engine\[digits\]"):
        builtin_folder("builtin:digits")


def test_digits_through_the_training_stream_eval_and_shards(cache, tmp_path):
    cfg = load_config(None, ["data.path=builtin:digits", "data.global_size=32", "data.local_size=16",
                             "data.num_local=2", "data.num_workers=0", "model.patch_size=8"])
    batch = next(iter(build_data_stream(cfg.data, cfg.mask, batch_size=4, patch_size=8, seed=0)))
    assert batch.global_crops.shape == (8, 3, 32, 32) and set(batch.labels.tolist()) <= set(range(10))
    assert len(build_eval_dataset("builtin:digits:val", cfg)) == 360
    manifest = write_shards("builtin:digits:val", tmp_path / "shards", workers=1, progress=False)
    assert manifest["total"] == 360 and manifest["classes"] == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="only the folder-backed built-in datasets"):
        write_shards("builtin:patterns", tmp_path / "other", workers=1, progress=False)
