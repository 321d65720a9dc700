"""Data pipeline: multi-crop transform, image folder, sampler order, the masking collate and resumable stream."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.batch import Batch
from ibot_engine.data.cpu_aug import MultiCropTransform
from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.masking import generate_masks
from ibot_engine.data.normalise import IMAGENET_MEAN, IMAGENET_STD, normalise
from ibot_engine.data.sources import DataStream, EpochBatchSampler, StreamPlace, build_dataset
from ibot_engine.data.stream import BatchStream, build_data_stream

PATCH = 8
GLOBAL, LOCAL = 32, 16


def _data_cfg(path: str = "unused", **overrides: object) -> DataConfig:
    fields = {"path": path, "global_size": GLOBAL, "local_size": LOCAL, "num_local": 2, "num_workers": 0}
    return DataConfig(**{**fields, **overrides})


def _noise_image(index: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    pixels = np.random.default_rng(index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[0, 0] = index  # the tag transform below reads the index back from here
    return Image.fromarray(pixels)


class IndexImages(torch.utils.data.Dataset):
    """`n` noise images; pixel (0, 0) holds the index, the label is index % 3."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.classes = ["a", "b", "c"]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return _noise_image(index), index % 3


def _stream(n: int = 13, *, batch_size: int = 4, **kwargs: object) -> DataStream:
    data_cfg = kwargs.pop("data_cfg", None) or _data_cfg()
    mask_cfg = kwargs.pop("mask_cfg", None) or MaskConfig()
    return DataStream(IndexImages(n), data_cfg, mask_cfg, StreamPlace(batch_size, PATCH, 5, **kwargs))


def _take(stream: DataStream, count: int) -> list[Batch]:
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("unreachable: the stream is endless")


def _assert_same(a: Batch, b: Batch) -> None:
    for name in ("global_crops", "local_crops", "masks", "mask_indices", "labels", "indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.num_skipped == b.num_skipped


# ---------------------------------------------------------------------------------------------------------------
# Multi-crop transform


def test_multicrop_shapes_ranges_and_seeding() -> None:
    transform = MultiCropTransform(_data_cfg(num_local=3))
    image = _noise_image(3, size=(48, 40))
    views = transform(image, seed=11)
    assert len(views) == 5
    for i, view in enumerate(views):
        size = GLOBAL if i < 2 else LOCAL
        assert view.shape == (3, size, size)
        assert view.dtype == torch.uint8  # normalised to float32 by the collate, the whole batch at once
    # Normalised [0, 1] pixels: (0 - mean) / std <= x <= (1 - mean) / std per channel.
    low = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])[:, None, None]
    high = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])[:, None, None]
    for view in normalise(torch.stack(views[:2])).unbind(0) + normalise(torch.stack(views[2:])).unbind(0):
        assert view.dtype == torch.float32
        assert torch.all(view >= low - 1e-5)
        assert torch.all(view <= high + 1e-5)
        assert view.std() > 0
    extremes = normalise(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    torch.testing.assert_close(extremes[0, :, 0, 0], low.flatten())
    torch.testing.assert_close(extremes[0, :, 0, 1], high.flatten())
    again = transform(image, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = transform(image, seed=12)
    assert not any(torch.equal(a, b) for a, b in zip(views, other))
    # Views of one call differ from each other (independent crops).
    assert not torch.equal(views[0], views[1])
    assert not torch.equal(views[2], views[3])


def test_multicrop_leaves_global_rng_alone() -> None:
    transform = MultiCropTransform(_data_cfg())
    image = _noise_image(0)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    first = transform(image, seed=1)
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
    # ... and the global state does not leak into the views.
    torch.manual_seed(999)
    assert all(torch.equal(a, b) for a, b in zip(first, transform(image, seed=1)))


def test_multicrop_converts_non_rgb() -> None:
    views = MultiCropTransform(_data_cfg(num_local=0))(_noise_image(1).convert("L"), seed=0)
    assert [v.shape for v in views] == [(3, GLOBAL, GLOBAL)] * 2


# ---------------------------------------------------------------------------------------------------------------
# Image folder


def _save(path: Path, index: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix.lower()]
    _noise_image(index, size=(20, 20)).save(path, format=fmt)


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    _save(tmp_path / "zebra" / "1.JPG")
    _save(tmp_path / "zebra" / "nested" / "2.png")
    _save(tmp_path / "ant" / "3.jpeg")
    _save(tmp_path / "ant" / "4.Webp")
    _save(tmp_path / "ant" / ".hidden.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "top_level_ignored.bmp")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["ant", "zebra"]
    assert len(dataset) == 4
    assert [label for _, label in dataset.samples] == [0, 0, 1, 1]
    image, label = dataset[3]
    assert image.mode == "RGB"
    assert image.size == (20, 20)
    assert label == 1


def test_flat_folder(tmp_path: Path) -> None:
    for i, name in enumerate(["b.bmp", "a.PNG", "c.jpg"]):
        _save(tmp_path / name, i)
    dataset = ImageFolderDataset(str(tmp_path))
    assert dataset.classes == []
    assert [p.name for p, _ in dataset.samples] == ["a.PNG", "b.bmp", "c.jpg"]
    assert {dataset[i][1] for i in range(3)} == {-1}


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        ImageFolderDataset(missing)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"text.*no images"):
        ImageFolderDataset(tmp_path / "text")


def test_corrupt_image_is_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "a.png", 0)
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
    _save(tmp_path / "c.png", 2)
    truncated = (tmp_path / "c.png").read_bytes()
    (tmp_path / "d.png").write_bytes(truncated[: len(truncated) // 2])
    dataset = ImageFolderDataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ibot_engine.data.folder"):
        image, label, skipped = dataset.load(1)
        assert (label, skipped) == (-1, 1)
        assert np.array_equal(np.asarray(image), np.asarray(dataset.load(2)[0]))  # c.png took b.jpg's place
        # d.png (truncated) wraps around to a.png.
        _, _, skipped = dataset.load(3)
        assert skipped == 1
    assert "b.jpg" in caplog.text
    assert "d.png" in caplog.text
    # Each bad file is logged once per process, however often it is drawn.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ibot_engine.data.folder"):
        dataset.load(1)
    assert caplog.text == ""


def test_all_images_unreadable(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="could be read"):
        ImageFolderDataset(tmp_path).load(0)


def test_stream_reports_skipped(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"{i}.png", i)
    (tmp_path / "3.png").write_bytes(b"broken")
    stream = build_data_stream(_data_cfg(str(tmp_path)), MaskConfig(), batch_size=4, patch_size=PATCH, seed=0)
    for batch in _take(stream, 2):  # 2 epochs of one batch: the broken file is drawn once in each
        assert batch.num_skipped == 1
        assert sorted(set(batch.indices.tolist())) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Sampler and stream


def test_rank_slices_concatenate_to_the_single_rank_batch() -> None:
    one = iter(EpochBatchSampler(50, 4, seed=1, rank=0, world_size=1))
    ranks = [iter(EpochBatchSampler(50, 2, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert EpochBatchSampler(50, 4, seed=1, rank=0, world_size=1).steps_per_epoch == 12
    for _ in range(30):  # two and a half epochs
        assert next(one) == next(ranks[0]) + next(ranks[1])


def test_each_sample_at_most_once_per_epoch() -> None:
    sampler = iter(EpochBatchSampler(50, 4, seed=1, rank=0, world_size=1))
    epochs = []
    for _ in range(2):
        keys = [key for _ in range(12) for key in next(sampler)]
        assert len({key.epoch for key in keys}) == 1
        indices = [key.index for key in keys]
        assert len(indices) == len(set(indices)) == 48  # drop_last: 2 of 50 left out
        epochs.append(indices)
    assert epochs[0] != epochs[1]  # a new permutation every epoch


def test_sampler_starts_mid_run() -> None:
    full = iter(EpochBatchSampler(13, 4, seed=0, rank=0, world_size=1))
    reference = [next(full) for _ in range(8)]
    resumed = iter(EpochBatchSampler(13, 4, seed=0, rank=0, world_size=1, start_epoch=1, start_batch=1))
    assert [next(resumed) for _ in range(4)] == reference[4:]


def test_batch_is_view_major() -> None:
    class TagTransform:
        """View v of image i is filled with 100 * i + v (globals) or 100 * i + 50 + v (locals)."""

        def __call__(self, image: Image.Image, seed: int) -> list[torch.Tensor]:
            index = image.getpixel((0, 0))[0]
            views = [torch.full((3, GLOBAL, GLOBAL), 100.0 * index + v) for v in range(2)]
            return views + [torch.full((3, LOCAL, LOCAL), 100.0 * index + 50 + v) for v in range(3)]

    stream = _stream(13, batch_size=4, data_cfg=_data_cfg(num_local=3))
    stream.samples.views = TagTransform()
    batch = next(iter(stream))
    indices = batch.indices
    assert batch.batch_size == 4
    assert batch.global_crops.shape == (8, 3, GLOBAL, GLOBAL)
    assert batch.local_crops.shape == (12, 3, LOCAL, LOCAL)
    expected_global = torch.cat([100.0 * indices + v for v in range(2)])
    expected_local = torch.cat([100.0 * indices + 50 + v for v in range(3)])
    torch.testing.assert_close(batch.global_crops[:, 0, 0, 0], expected_global.float())
    torch.testing.assert_close(batch.local_crops[:, 0, 0, 0], expected_local.float())
    torch.testing.assert_close(batch.labels, indices % 3)
    # Masks follow the same order: view 0 of every image, then view 1.
    masks = generate_masks(
        MaskConfig(), (4, 4), seed=5, epoch=0, batch=0, rank=0, indices=indices.tolist(), num_views=2
    )
    assert torch.equal(batch.masks, masks)


def test_batch_fields() -> None:
    batch = next(iter(_stream(8, batch_size=4, data_cfg=_data_cfg(num_local=0))))
    assert batch.global_crops.dtype == torch.float32
    assert batch.local_crops.shape == (0, 3, LOCAL, LOCAL)
    assert batch.masks.shape == (8, GLOBAL // PATCH, GLOBAL // PATCH)
    assert batch.masks.dtype == torch.bool
    assert batch.mask_indices.dtype == torch.int64
    assert torch.equal(batch.mask_indices, batch.masks.flatten().nonzero().flatten())
    assert batch.labels.dtype == batch.indices.dtype == torch.int64
    assert batch.num_skipped == 0
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, Batch)
    _assert_same(moved, batch)


def test_same_global_batch_whatever_the_world_size() -> None:
    single = _take(_stream(13, batch_size=4), 4)
    ranks = [_take(_stream(13, batch_size=2, rank=r, world_size=2), 4) for r in range(2)]
    for b, whole in enumerate(single):
        halves = [ranks[r][b] for r in range(2)]
        # Per view, rank 0's images then rank 1's make up the single-rank view block.
        for name, num_views in (("global_crops", 2), ("local_crops", 2), ("masks", 2)):
            per_view = [getattr(h, name).chunk(num_views) for h in halves]
            joined = torch.cat([torch.cat([per_view[0][v], per_view[1][v]]) for v in range(num_views)])
            assert torch.equal(joined, getattr(whole, name)), name
        assert torch.equal(torch.cat([h.indices for h in halves]), whole.indices)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_identical_batches(num_workers: int) -> None:
    data_cfg = _data_cfg(num_workers=num_workers)
    reference = _take(_stream(13, batch_size=4), 8)  # 3 batches per epoch: crosses two epoch ends

    interrupted = _stream(13, batch_size=4, data_cfg=data_cfg)
    for batch, expected in zip(_take(interrupted, 4), reference):
        _assert_same(batch, expected)  # workers change nothing
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batch": 1}  # consumed batches, whatever the workers prefetched

    resumed = _stream(13, batch_size=4, data_cfg=data_cfg)
    resumed.load_state_dict(state)
    for batch, expected in zip(_take(resumed, 4), reference[4:]):
        _assert_same(batch, expected)

    # Loading a state into a stream that is mid-iteration rewinds it.
    interrupted.load_state_dict({"epoch": 0, "batch": 2})
    _assert_same(_take(interrupted, 1)[0], reference[2])


def test_stream_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    _take(_stream(13, batch_size=4), 2)
    assert torch.equal(torch.get_rng_state(), state)


def test_dinov2_masks_in_stream() -> None:
    batch = next(iter(_stream(13, batch_size=4, mask_cfg=MaskConfig(variant="dinov2"))))
    assert int((batch.masks.flatten(1).sum(1) > 0).sum()) == 4  # int(2 * 4 * 0.5) of the 8 global crops


def test_dataset_smaller_than_a_global_batch() -> None:
    with pytest.raises(ValueError, match=r"'unused'.*train\.batch_size"):
        _stream(7, batch_size=4, world_size=2)


def test_build_dataset_dispatch(tmp_path: Path) -> None:
    from ibot_engine.data.synthetic import PatternsDataset, ShapesDataset

    shapes = build_dataset(_data_cfg("builtin:shapes", builtin_size=37))
    assert isinstance(shapes, ShapesDataset) and len(shapes) == 37 and shapes.split == "train"
    assert isinstance(build_dataset(_data_cfg("builtin:patterns", builtin_size=16)), PatternsDataset)
    with pytest.raises(ValueError, match=r"data\.path is empty"):
        build_dataset(_data_cfg(""))
    _save(tmp_path / "x.png")
    assert isinstance(build_dataset(_data_cfg(str(tmp_path))), ImageFolderDataset)
    with pytest.raises(ValueError, match="missing"):
        build_dataset(_data_cfg(str(tmp_path / "missing")))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_gpu_augmenter_serves_image_data_and_resumes(num_workers: int) -> None:
    """data.augment=gpu without shards: the workers keep uint8 pixels and draw the views' parameters, the stream
    crops on its device (CPU tensors here) one batch ahead. Same samples, labels and masks as the CPU augmenter,
    the crops of the GPU recipe, and the same resume positions."""
    gpu_cfg = _data_cfg(augment="gpu", num_workers=num_workers)
    stream = _stream(13, batch_size=4, data_cfg=gpu_cfg)
    assert isinstance(stream, BatchStream) and stream.augmenter.on_device
    cpu_batches, gpu_batches = _take(_stream(13, batch_size=4), 5), _take(stream, 5)
    for cpu, gpu in zip(cpu_batches, gpu_batches, strict=True):
        for name in ("masks", "mask_indices", "labels", "indices"):
            assert torch.equal(getattr(cpu, name), getattr(gpu, name)), name
        assert gpu.global_crops.shape == cpu.global_crops.shape and gpu.local_crops.shape == cpu.local_crops.shape
        assert not torch.equal(gpu.global_crops, cpu.global_crops)  # another recipe implementation
        assert torch.isfinite(gpu.global_crops).all() and torch.isfinite(gpu.local_crops).all()
    state = stream.state_dict()
    assert state == {"epoch": 1, "batch": 2}  # handed-over batches only, not the one finished ahead
    resumed = _stream(13, batch_size=4, data_cfg=gpu_cfg)
    resumed.load_state_dict({"epoch": 1, "batch": 0})
    for batch, expected in zip(_take(resumed, 2), gpu_batches[3:], strict=True):
        _assert_same(batch, expected)


def test_device_augmenter_prepares_one_batch_ahead_of_the_hand_over() -> None:
    """The schedule of `StreamBase` with a device augmenter: batch k + 1 is finished before batch k is handed over
    (on CUDA its work is queued on a side stream and runs during step k), and the position counts handed-over
    batches only."""
    from ibot_engine.data.sources import StreamBase

    events: list[str] = []

    class Recorder:
        on_device = True

        def finish(self, raw: int) -> Batch:
            events.append(f"finish {raw}")
            return Batch(*(torch.zeros(1) for _ in range(6)), num_skipped=raw)  # type: ignore[arg-type]

    class Counting(StreamBase):
        def __init__(self) -> None:
            self.augmenter, self.device, self.batch, self.raw = Recorder(), torch.device("cpu"), 0, 0

        def _next_raw(self) -> tuple[int, None]:
            self.raw += 1
            return self.raw - 1, None

        def _advance(self, batch: Batch, token: None) -> None:
            events.append(f"hand over {batch.num_skipped}")
            self.batch += 1

    stream = Counting()
    batches = iter(stream)
    next(batches)
    assert events == ["finish 0", "finish 1", "hand over 0"] and stream.batch == 1
    next(batches)
    assert events[3:] == ["finish 2", "hand over 1"] and stream.batch == 2
