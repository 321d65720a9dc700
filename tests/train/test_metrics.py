"""The metrics module (engine/train/metrics.py): TensorBoard scalars next to metrics.jsonl (`run.tensorboard=true`),
and the message when the package is absent."""

from __future__ import annotations

import logging
import sys

import pytest

import ibot_engine.train.metrics as metrics
from ibot_engine.train.loop import train
from tests.helpers import read_metrics, tiny_config


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(f"run.dir={tmp_path}", "train.steps=3", "run.tensorboard=true",
                             "eval.knn_every=3", "data.builtin_size=40"))
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]  # records[0] is the random-init k-NN (step 0)
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in steps] == [1, 2, 3]
    for event, record in zip(acc.Scalars("train/loss"), steps):
        assert event.value == pytest.approx(record["loss"], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/knn_top1")] == [0, 3]
    assert [e.value for e in acc.Scalars("eval/knn_top1")] == pytest.approx([records[0]["knn_top1"],
                                                                             records[-1]["knn_top1"]])
    for key in ("teacher_cls_entropy_frac", "student_cls_std", "cls_center_norm"):  # training health
        assert [e.value for e in acc.Scalars(f"health/{key}")] == pytest.approx([r[key] for r in steps], rel=1e-6)


def test_missing_tensorboard_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    monkeypatch.setattr(metrics, "_warned_missing", False)
    with caplog.at_level(logging.WARNING, logger="ibot_engine.train.metrics"):
        assert metrics.open_writer(tmp_path) is None
        assert metrics.open_writer(tmp_path) is None
        train(tiny_config(f"run.dir={tmp_path}", "train.steps=1", "run.tensorboard=true"))
    warnings = [r for r in caplog.records if "tensorboard package is not installed" in r.getMessage()]
    assert len(warnings) == 1
    assert len(read_metrics(tmp_path)) == 1 and not (tmp_path / "tensorboard").exists()
