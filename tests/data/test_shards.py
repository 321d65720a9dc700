"""WebDataset shards: writer round trip, exact-epoch split over ranks and workers, faults, errors, resume, training."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ibot_engine.cli import main as cli_main
from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.batch import Batch
from ibot_engine.data.shards.resolve import MANIFEST, assign_shards, key_hash, resolve_shards
from ibot_engine.data.shards.source import ShardStream, SkipCounter, shard_samples
from ibot_engine.data.shards.write import write_shards
from ibot_engine.data.stream import build_data_stream
from tests.helpers import TINY_OVERRIDES, read_metrics

CPU = torch.device("cpu")
CORRUPT_JPEG = b"\xff\xd8 garbage \xff\xd9"  # a JPEG header and trailer around junk: PIL cannot decode it


def _jpeg(index: int, size: tuple[int, int] = (40, 36)) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _cfg(shards: str, **overrides: object) -> DataConfig:
    fields = {"shards": shards, "global_size": 32, "local_size": 16, "num_local": 2, "num_workers": 0,
              "shuffle_buffer": 4}
    return DataConfig(**{**fields, **overrides})


_OPEN: list[ShardStream] = []


@pytest.fixture(autouse=True)
def _close_streams():
    """Stop every stream's workers at the end of its test (forking new workers beside live ones is slow)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def _stream(shards: str, *, batch_size: int = 3, rank: int = 0, world_size: int = 1, **overrides: object
            ) -> ShardStream:
    stream = build_data_stream(_cfg(shards, **overrides), MaskConfig(min_block_patches=2), batch_size=batch_size,
                               patch_size=8, seed=7, rank=rank, world_size=world_size, device=CPU)
    _OPEN.append(stream)
    return stream


def _epoch(stream: ShardStream) -> list[Batch]:
    """The batches of the stream's current epoch (from its current position)."""
    epoch = stream.epoch
    batches = []
    for batch in stream:
        if stream.epoch != epoch and stream.batch == 1:  # the rank ran out early: this is the next epoch's first
            return batches
        batches.append(batch)
        if stream.epoch != epoch:
            return batches
    raise AssertionError("unreachable")


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 8 JPEGs (some PNG) plus one unreadable file."""
    root = tmp_path_factory.mktemp("images")
    for c, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir()
        for i in range(8):
            index = 10 * c + i
            if i == 5:
                Image.open(io.BytesIO(_jpeg(index))).save(root / name / f"{i}.png")
            else:
                (root / name / f"{i}.jpg").write_bytes(_jpeg(index))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 shards x 6 samples (48), labels key % 4: every 2 x 2 slot gets 12 samples = 4 batches of 3."""
    root = tmp_path_factory.mktemp("even")
    shards = []
    for s in range(8):
        name = f"train-{s:06d}.tar"
        _write_tar(root / name, [{"__key__": f"{6 * s + i:09d}", "jpg": _jpeg(6 * s + i), "cls": str((6 * s + i) % 4)}
                                 for i in range(6)])
        shards.append({"name": name, "count": 6})
    (root / MANIFEST).write_text(json.dumps({"format": "ibot-shards/1", "total": 48, "classes": list("abcd"),
                                             "shards": shards, "skipped": []}))
    return root


# ---------------------------------------------------------------------------------------------------------------
# Writer


def test_writer_round_trip_keeps_every_sample_and_label(image_folder: Path, tmp_path: Path) -> None:
    manifest = write_shards(image_folder, tmp_path / "out", max_count=5, workers=2, progress=False)
    assert manifest["classes"] == ["cat", "dog", "eel"]
    assert manifest["total"] == 24
    assert [s["path"] for s in manifest["skipped"]] == [str(image_folder / "dog" / "broken.jpg")]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == manifest
    names = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert names == [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(names))]
    assert all(s["count"] <= 5 for s in manifest["shards"])

    shards = resolve_shards(str(tmp_path / "out"))
    assert shards.counts == [s["count"] for s in manifest["shards"]]
    samples = list(shard_samples(iter(shards.urls), SkipCounter()))
    # Keys are source positions in the writer's (sorted) listing: cat/0..7, dog/0..7 (broken.jpg skipped), eel/...
    source = [(p, c) for c, name in enumerate(("cat", "dog", "eel"))
              for p in sorted((image_folder / name).iterdir()) if p.name != "broken.jpg"]
    listing = sorted([*source, (image_folder / "dog" / "broken.jpg", 1)])
    by_key = {s["__key__"]: s for s in samples}
    assert len(by_key) == len(samples) == 24
    for position, (path, label) in enumerate(listing):
        if path.name == "broken.jpg":
            assert f"{position:09d}" not in by_key
            continue
        sample = by_key[f"{position:09d}"]
        assert int(sample["cls"]) == label
        stored = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        original = np.asarray(Image.open(path).convert("RGB"))
        if path.suffix == ".jpg":
            assert sample["jpg"] == path.read_bytes()  # JPEGs are stored as they are
        else:
            assert stored.shape == original.shape  # PNG re-encoded as JPEG (quality 90)
            assert np.abs(stored.astype(int) - original).mean() < 40


def test_writer_max_side_and_file_list(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(_jpeg(1, size=(300, 120)))
    small = tmp_path / "small.jpg"
    small.write_bytes(_jpeg(2))
    (tmp_path / "list.txt").write_text(f"{big} 3\nsmall.jpg 1\nmissing.jpg 0\n")
    manifest = write_shards(tmp_path / "list.txt", tmp_path / "out", max_side=100, workers=1, progress=False)
    assert manifest["total"] == 2 and len(manifest["skipped"]) == 1
    samples = list(shard_samples(iter(resolve_shards(str(tmp_path / "out")).urls), SkipCounter()))
    sizes = {int(s["cls"]): Image.open(io.BytesIO(s["jpg"])).size for s in samples}
    assert sizes == {3: (100, 40), 1: (40, 36)}
    with pytest.raises(ValueError, match="already holds"):
        write_shards(tmp_path / "list.txt", tmp_path / "out", workers=1, progress=False)


def test_cli_shards_write(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["shards", "write", str(image_folder), str(tmp_path / "s"), "--max-count", "10",
                     "--workers", "1"]) == 0
    assert "24 images in 3 shards" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Reader: order, split, seeds


def test_reader_every_sample_and_label_once(even_shards: Path) -> None:
    stream = _stream(str(even_shards), batch_size=4)
    assert stream.steps_per_epoch == 12 and stream.num_samples == 48 and stream.classes == list("abcd")
    batches = _epoch(stream)
    assert len(batches) == 12
    indices = torch.cat([b.indices for b in batches]).tolist()
    labels = torch.cat([b.labels for b in batches]).tolist()
    expected = {key_hash(f"{k:09d}"): k % 4 for k in range(48)}
    assert sorted(indices) == sorted(expected)
    assert all(expected[i] == label for i, label in zip(indices, labels))
    assert batches[0].global_crops.shape == (2 * 4, 3, 32, 32) and batches[0].local_crops.shape == (2 * 4, 3, 16, 16)
    assert sum(b.num_skipped for b in batches) == 0


def test_brace_pattern_reads_the_same_shards(even_shards: Path) -> None:
    pattern = str(even_shards / "train-{000000..000007}.tar")
    shards = resolve_shards(pattern)
    assert shards.urls == resolve_shards(str(even_shards)).urls and shards.counts == [6] * 8
    assert resolve_shards(f"{even_shards}/train-{{000000..000001}}.tar::{even_shards}/train-000005.tar").counts == [
        6, 6, 6]


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(even_shards: Path) -> None:
    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    views: dict[int, torch.Tensor] = {}
    for rank in (0, 1):
        stream = _stream(str(even_shards), rank=rank, world_size=2, num_workers=2)
        assert stream.steps_per_epoch == 8
        for _ in range(2):
            batches = _epoch(stream)
            assert len(batches) == 8
            seen[rank].append(torch.cat([b.indices for b in batches]).tolist())
            if not views:
                views.update({int(i): b.global_crops[j] for b in batches for j, i in enumerate(b.indices)})
    everything = sorted(key_hash(f"{k:09d}") for k in range(48))
    for epoch in (0, 1):
        both = seen[0][epoch] + seen[1][epoch]
        assert sorted(both) == everything  # each sample exactly once per epoch over the 2 x 2 slots
    assert seen[0][0] != seen[0][1]  # the order changes between epochs
    # A sample's views depend on (seed, epoch, key) only: one rank with no worker makes the same ones.
    single = _epoch(_stream(str(even_shards), batch_size=3))
    for b in single:
        for j, i in enumerate(b.indices.tolist()):
            if i in views:
                assert torch.equal(views[i], b.global_crops[j])


def test_resampled_mode_is_endless_reproducible_and_seeded_per_rank(even_shards: Path) -> None:
    def first(rank: int, count: int = 6) -> list[list[int]]:
        stream = _stream(str(even_shards), rank=rank, world_size=2, num_workers=2, shard_mode="resampled")
        assert stream.steps_per_epoch == 8
        out = []
        for batch in stream:
            out.append(batch.indices.tolist())
            if len(out) == count:
                return out
        raise AssertionError

    assert first(0) == first(0)
    assert first(0) != first(1)
    stream = _stream(str(even_shards), shard_mode="resampled", epoch_samples=12)
    assert stream.steps_per_epoch == 4
    for _ in range(3):  # several epochs: the stream does not end
        assert len(_epoch(stream)) == 4


def test_assign_shards_balances_slots() -> None:
    counts = [10, 3, 3, 3, 3, 8, 1, 7]
    slots = assign_shards(counts, 3)
    assert sorted(i for s in slots for i in s) == list(range(8))
    loads = [sum(counts[i] for i in s) for s in slots]
    assert max(loads) - min(loads) <= 3  # greedy largest-first: within the smallest shard it placed last (3)
    assert [sum(6 for _ in s) for s in assign_shards([6] * 8, 4)] == [12] * 4


# ---------------------------------------------------------------------------------------------------------------
# Faults and errors


@pytest.fixture
def faulty_shards(tmp_path: Path) -> tuple[Path, set[int], set[int]]:
    """good.tar: 6 good samples + a corrupt JPEG + a truncated JPEG + a sample without image; cut.tar: a truncated
    tar; empty.tar: a tar with nothing; zero.tar: 0 bytes. Returns (folder, keys surely read, keys maybe read)."""
    good = [{"__key__": f"g{i}", "jpg": _jpeg(i), "cls": "1"} for i in range(6)]
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9", "cls": "0"},
        {"__key__": "truncated", "jpg": _jpeg(99)[:300], "cls": "0"},
        {"__key__": "noimage", "cls": "0", "txt": b"caption only"},
    ]
    _write_tar(tmp_path / "a-good.tar", good[:3] + bad + good[3:])
    cut = [{"__key__": f"c{i}", "jpg": _jpeg(20 + i)} for i in range(8)]
    _write_tar(tmp_path / "b-cut.tar", cut)
    data = (tmp_path / "b-cut.tar").read_bytes()
    (tmp_path / "b-cut.tar").write_bytes(data[: len(data) // 2])
    _write_tar(tmp_path / "c-empty.tar", [])
    (tmp_path / "d-zero.tar").write_bytes(b"")
    return tmp_path, {key_hash(f"g{i}") for i in range(6)}, {key_hash(f"c{i}") for i in range(8)}


@pytest.mark.parametrize("augment,decode", [("cpu", "gpu"), ("gpu", "gpu"), ("gpu", "cpu")])
def test_faults_are_skipped_and_counted(faulty_shards: tuple[Path, set[int], set[int]], augment: str, decode: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    folder, good, maybe = faulty_shards
    stream = _stream(str(folder), batch_size=1, epoch_samples=100, shuffle_buffer=0, augment=augment, decode=decode)
    with caplog.at_level(logging.WARNING):
        batches = _epoch(stream)  # the rank runs out of samples before 100: the epoch ends early, warned
    seen = [int(i) for b in batches for i in b.indices]
    assert good <= set(seen) and set(seen) <= good | maybe and len(seen) == len(set(seen))
    assert len(set(seen) & maybe) >= 1  # the part of the truncated tar before the cut is read
    # corrupt JPEG, truncated JPEG, sample without image, truncated tar, empty tar, 0-byte file
    assert stream.skipped_by_epoch[0] == 6
    # The batches report them as they come; skips after a worker's last batch ride on the next epoch's first batch.
    assert sum(b.num_skipped for b in batches) <= 6
    assert sum(b.num_skipped for b in batches) + sum(b.num_skipped for b in _epoch(stream)) >= 6
    log = caplog.text
    for needle in ("corrupt", "truncated", "noimage", "b-cut.tar", "empty shard", "d-zero.tar", "ran out"):
        assert needle in log, needle


def test_missing_or_unreadable_shards_stop_with_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"matches no file .*train-000000\.tar"):
        _stream(str(tmp_path / "train-{000000..000003}.tar"))
    (tmp_path / "x-0.tar").write_bytes(b"")
    (tmp_path / "x-1.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match=r"no shard is readable: .*x-0\.tar.*x-1\.tar"):
        _stream(str(tmp_path / "x-{0..1}.tar"), epoch_samples=10)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds no manifest\.json and no \.tar"):
        _stream(str(empty))
    # Through the trainer's entry point, before any model is built.
    with pytest.raises(ValueError, match="matches no file"):
        build_data_stream(_cfg(str(tmp_path / "nope-{0..9}.tar")), MaskConfig(), batch_size=2, patch_size=8, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("stop_after", [1, 5])
def test_exact_resume_loses_and_repeats_nothing(even_shards: Path, stop_after: int) -> None:
    def stream() -> ShardStream:
        return _stream(str(even_shards), rank=1, world_size=2, num_workers=2, shuffle_buffer=5)

    reference = _epoch(stream())
    first = stream()
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop_after:
            break
    state = first.state_dict()
    assert state["samples"] == stop_after * 3 * 2 and state["batch"] == stop_after
    state = torch.load(io.BytesIO(_saved(state)), weights_only=True)  # as a checkpoint would hold it
    resumed = stream()
    resumed.load_state_dict(state)
    tail = _epoch(resumed)
    keys = [int(i) for b in head + tail for i in b.indices]
    assert len(keys) == len(set(keys)) == 24
    assert keys == [int(i) for b in reference for i in b.indices]  # the very same order as without the stop
    for a, b in zip(head + tail, reference):
        assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.masks, b.masks)


def _saved(state: dict) -> bytes:
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


def test_resume_with_another_layout_restarts_the_epoch(even_shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = _stream(str(even_shards), num_workers=2)
    next(iter(first))
    state = first.state_dict()
    other = _stream(str(even_shards), num_workers=0)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert other.state_dict()["batch"] == 0 and "restarting epoch 0" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Training end to end


@pytest.mark.parametrize("augment", ["cpu", "gpu"])
def test_ibot_train_from_shards(even_shards: Path, tmp_path: Path, augment: str) -> None:
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.shards={even_shards}", f"data.augment={augment}", "data.num_workers=1",
                 "train.batch_size=4", "train.steps=3", f"run.dir={run}", "checkpoint.every=2"]
    assert cli_main(["train", *overrides]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["data_skipped"] == 0 and np.isfinite(r["loss"]) for r in records)
    state = json.loads((run / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert state["data"]["batch"] == 3 and state["data"]["mode"] == "exact" and state["data"]["samples"] == 12



def test_ibot_train_from_shards_stop_and_resume_equals_uninterrupted_run(
        even_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the trainer and its DCP checkpoint (the stream's cursors live in meta.json): a run killed after
    step 3 and resumed from its step-2 checkpoint logs exactly the losses of an uninterrupted run."""
    import ibot_engine.train.loop as train_module

    def overrides(run: Path) -> list[str]:
        return [*TINY_OVERRIDES, f"data.shards={even_shards}", "data.num_workers=2", "train.batch_size=4",
                "train.steps=5", f"run.dir={run}", "checkpoint.every=2"]

    assert cli_main(["train", *overrides(tmp_path / "a")]) == 0
    inner, calls = train_module.train_step, {"n": 0}

    def stop_after_3(*args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return inner(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_module, "train_step", stop_after_3)
        with pytest.raises(KeyboardInterrupt):
            cli_main(["train", *overrides(tmp_path / "b")])
    assert cli_main(["train", *overrides(tmp_path / "b")]) == 0  # resumes from step 2, mid-epoch
    keys = ("step", "loss", "loss_cls", "loss_patch", "grad_norm")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]

@pytest.mark.gpu
def test_gpu_path_stream_on_cuda(even_shards: Path) -> None:
    """augment=gpu on CUDA: batches arrive on the device, with the CPU path's shapes (GPU sessions)."""
    cfg = _cfg(str(even_shards), augment="gpu", num_workers=2)
    stream = build_data_stream(cfg, MaskConfig(min_block_patches=2), batch_size=4, patch_size=8, seed=7,
                               device=torch.device("cuda"))
    batches = _epoch(stream)
    assert len(batches) == 12
    assert all(b.global_crops.is_cuda and b.masks.is_cuda for b in batches)
    torch.cuda.synchronize()
    assert sorted(int(i) for b in batches for i in b.indices.cpu()) == sorted(key_hash(f"{k:09d}") for k in range(48))


def test_data_benchmark_smoke(even_shards: Path, tmp_path: Path) -> None:
    """`python -m ibot_benchmarks.data` end to end at toy sizes: official / ours / GPU path on shards and on the folder
    of the same images, the per-core ratio, the training step's data wait; a report with machine, versions, command.
    Run as a user runs it: tests import nothing from the benchmarks."""
    out = tmp_path / "report.md"
    run = subprocess.run([sys.executable, "-m", "ibot_benchmarks.data", "--shards", str(even_shards), "--workers",
                          "0,1", "--batches", "2", "--warmup", "1", "--batch-size", "4", "--global-size", "32",
                          "--local-size", "16", "--num-local", "2", "--patch-size", "8", "--device", "cpu",
                          "--train-workers", "0", "--train-steps", "1", "--train-overrides",
                          "model.arch=vit_tiny model.out_dim=256 precision=fp32 train.batch_size=4", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = out.read_text()
    for needle in ("machine:", "torch ", "OpenCV ", "webdataset ", "command: python -m ibot_benchmarks.data",
                   "48 JPEGs in 8 shards", "image folder", "| shards | official (PIL + transforms v1) | 1 |",
                   "| folder | ours (data.augment=cpu) | 0 |", "| shards | gpu (decode gpu, ops on cpu) | 0 |",
                   "## Ours vs the official transforms, per core", "| folder | 1 |", "## Data wait",
                   "| ours (data.augment=cpu) | 0 |", "unmeasured"):
        assert needle in text, needle
    assert len(list(Path(f"{even_shards}_folder").glob("*.jpg"))) == 48


def _torchrun_train(overrides: list[str]) -> str:
    """`torchrun --standalone --nproc-per-node=2 -m ibot_engine train ...` (gloo); returns its stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ibot_engine",
         "train", *overrides], capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.distributed
def test_torchrun_two_ranks_from_shards_checkpoints_every_cursor(even_shards: Path, tmp_path: Path) -> None:
    """2 gloo ranks x 2 workers train from shards; the checkpoint holds both ranks' worker positions."""
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.shards={even_shards}", "data.num_workers=2", "train.batch_size=3",
                 "train.steps=2", f"run.dir={run}", "distributed.strategy=ddp"]
    _torchrun_train(overrides)
    state = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())["data"]
    assert state["world_size"] == 2 and state["batch"] == 2 and state["samples"] == 2 * 3 * 2
    assert len(state["cursors"]) == 2 and all(len(c) == 2 and sum(c) == 6 for c in state["cursors"])


def test_train_reports_skipped_samples_in_metrics(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "a.tar", [{"__key__": f"a{i}", "jpg": _jpeg(i)} for i in range(2)]
               + [{"__key__": "bad", "jpg": CORRUPT_JPEG}]
               + [{"__key__": f"a{i}", "jpg": _jpeg(i)} for i in range(2, 4)])
    _write_tar(shards / "b.tar", [{"__key__": f"b{i}", "jpg": _jpeg(10 + i)} for i in range(4)])
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.shards={shards}", "data.epoch_samples=8", "train.batch_size=4",
                 "train.steps=2", f"run.dir={run}"]
    assert cli_main(["train", *overrides]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    assert sum(r["data_skipped"] for r in records) == 1  # the corrupt JPEG, read in one of the two steps


@pytest.mark.distributed
def test_torchrun_two_ranks_report_every_ranks_skipped_samples(tmp_path: Path) -> None:
    """Each rank reads two shards that hold one corrupt JPEG each: the metrics count every rank's skips."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(4):
        good = [{"__key__": f"s{s}g{i}", "jpg": _jpeg(10 * s + i)} for i in range(4)]
        _write_tar(shards / f"s{s}.tar", [*good[:2], {"__key__": f"s{s}bad", "jpg": CORRUPT_JPEG},
                                           *good[2:]])
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.shards={shards}", "data.epoch_samples=16", "train.batch_size=4",
                 "train.steps=2", f"run.dir={run}", "distributed.strategy=ddp"]
    output = _torchrun_train(overrides)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    # Each rank logs every sample it skips; through its shuffle buffer a rank may leave a corrupt one unread.
    logged = re.findall(r"\[ibot r(\d) .*data: skipping sample s\dbad", output)
    assert set(logged) == {"0", "1"}, logged  # both ranks met a corrupt sample
    assert sum(r["data_skipped"] for r in records) == len(logged)  # every rank's skips, not rank 0's


def test_pipe_urls_stream_through_a_shell_command(even_shards: Path) -> None:
    """`pipe:CMD` shards (how object stores are read): here `cat`; no manifest, so epoch_samples gives the size."""
    spec = f"pipe:cat {even_shards}/train-{{000000..000007}}.tar"
    assert len(resolve_shards(spec).urls) == 8 and resolve_shards(spec).counts is None
    stream = _stream(spec, batch_size=4, epoch_samples=48)
    keys = [int(i) for b in _epoch(stream) for i in b.indices]
    assert sorted(keys) == sorted(key_hash(f"{k:09d}") for k in range(48))
    failing = _stream(f"pipe:cat {even_shards}/missing.tar::{spec}", batch_size=4, epoch_samples=48)
    _epoch(failing)
    assert failing.skipped_by_epoch[0] >= 1  # the failed command is skipped and counted
