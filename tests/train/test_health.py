"""Training-health metrics (each against its formula on a fixed batch), the collapse detector (fires on a forced
collapse, stays quiet otherwise), and where the metrics go: metrics.jsonl, the log line, `ibot plot`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import ibot_engine.model.ibot as ibot_module
from ibot_engine.tools.plot import plot_health_run
from ibot_engine.train.health import HEALTH_KEYS, CollapseDetector, TrainingCollapsedError, health_metrics
from ibot_engine.train.loop import train
from tests.helpers import read_metrics, tiny_config


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K, D = 32, 12
    return {
        "teacher_cls": torch.randn(8, K, generator=g) * 3, "teacher_patch": torch.randn(20, K, generator=g),
        "cls_center": torch.randn(K, generator=g) * 0.1, "patch_center": torch.randn(K, generator=g) * 0.1,
        "teacher_temp": 0.04, "patch_teacher_temp": 0.07,
        "student_cls_tokens": torch.randn(8, D, generator=g),
        "teacher_cls_tokens": torch.randn(8, D, generator=g) + 2.0,
    }


def test_each_health_metric_equals_its_formula():
    b = _batch()
    got = dict(zip(HEALTH_KEYS, health_metrics(**b).tolist(), strict=True))
    K = b["teacher_cls"].shape[1]

    def targets(logits, center, temp):
        return torch.distributions.Categorical(logits=(logits.double() - center.double()) / temp)

    cls = targets(b["teacher_cls"], b["cls_center"], b["teacher_temp"])
    patch = targets(b["teacher_patch"], b["patch_center"], b["patch_teacher_temp"])
    mean_probs = cls.probs.mean(0)
    expected = {
        "teacher_cls_entropy": cls.entropy().mean(), "teacher_cls_entropy_frac": cls.entropy().mean() / math.log(K),
        "teacher_cls_batch_entropy_frac": torch.distributions.Categorical(probs=mean_probs).entropy() / math.log(K),
        "teacher_cls_info_frac":  # H(mean p) - mean H(p): the mutual information of image and prototype, / ln K
            (torch.distributions.Categorical(probs=mean_probs).entropy() - cls.entropy().mean()) / math.log(K),
        "teacher_cls_max_prob": cls.probs.max(1).values.mean(),
        "teacher_patch_entropy": patch.entropy().mean(),
        "teacher_patch_entropy_frac": patch.entropy().mean() / math.log(K),
        "teacher_patch_max_prob": patch.probs.max(1).values.mean(),
        "cls_center_norm": b["cls_center"].double().norm(), "patch_center_norm": b["patch_center"].double().norm(),
    }
    for who in ("student", "teacher"):  # std over the batch of the unit rows, averaged over dimensions
        unit = b[f"{who}_cls_tokens"].double() / b[f"{who}_cls_tokens"].double().norm(dim=1, keepdim=True)
        expected[f"{who}_cls_std"] = ((unit - unit.mean(0)) ** 2).mean(0).sqrt().mean()
    assert set(expected) == set(HEALTH_KEYS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_health_extremes_uniform_one_hot_identical_and_no_masked_token():
    K = 16
    uniform = health_metrics(torch.zeros(6, K), torch.zeros(0, K), torch.zeros(K), torch.zeros(K), 0.04, 0.04,
                             torch.ones(6, 4), torch.ones(6, 4))
    m = dict(zip(HEALTH_KEYS, uniform.tolist(), strict=True))
    assert m["teacher_cls_entropy_frac"] == pytest.approx(1.0) and m["teacher_cls_max_prob"] == pytest.approx(1 / K)
    assert m["student_cls_std"] == 0.0 and m["teacher_cls_std"] == 0.0  # the same embedding for every image
    assert math.isnan(m["teacher_patch_entropy"])  # no masked token this step: no value rather than a made-up one
    one_hot = torch.full((6, K), -10.0)
    one_hot[:, 3] = 10.0  # every image picks prototype 3
    m = dict(zip(HEALTH_KEYS, health_metrics(one_hot, one_hot, torch.zeros(K), torch.zeros(K), 0.1, 0.1,
                                             torch.randn(6, 4), torch.randn(6, 4)).tolist(), strict=True))
    assert m["teacher_cls_batch_entropy_frac"] < 1e-3 and m["teacher_cls_max_prob"] > 0.999


def _healthy() -> dict[str, float]:
    return {"teacher_cls_entropy_frac": 0.6, "teacher_cls_batch_entropy_frac": 0.7, "student_cls_std": 0.05,
            "teacher_cls_std": 0.05, "teacher_patch_entropy_frac": 0.8}


def _near_uniform() -> dict[str, float]:
    """cls targets near uniform (0.99 of ln K, as the 64 px digits runs have them, so no information about the image),
    patch targets informative."""
    return {**_healthy(), "teacher_cls_entropy_frac": 0.99, "teacher_cls_batch_entropy_frac": 0.99}


def test_a_spread_under_the_floor_with_informative_targets_is_not_a_collapse():
    close = {**_healthy(), "teacher_cls_std": 1e-3}  # targets at 0.6 of ln K: the head still separates the images
    detector = CollapseDetector(embed_dim=192, patience=2)
    assert all(detector.update(step, close) == [] for step in range(10))
    detector = CollapseDetector(embed_dim=192, patience=2)
    assert "[teacher_cls_std]" in [detector.update(step, {**close, **_near_uniform(), "teacher_cls_std": 1e-3})
                                   for step in range(2)][1][0]


def test_detector_fires_once_per_kind_after_patience_and_forgets_interrupted_streaks(caplog):
    detector = CollapseDetector(embed_dim=64, patience=3)
    uniform = {**_healthy(), "teacher_cls_entropy_frac": 0.9995, "teacher_cls_batch_entropy_frac": 0.9995,
               "teacher_patch_entropy_frac": 0.9999}
    with caplog.at_level(logging.WARNING, logger="ibot_engine.train.health"):
        assert detector.update(10, uniform) == [] and detector.update(20, uniform) == []
        assert detector.update(30, _healthy()) == []  # the streak is broken
        assert detector.update(40, uniform) == [] and detector.update(50, uniform) == []
        fired = detector.update(60, uniform)
        assert len(fired) == 1 and "[uniform]" in fired[0] and "step 60" in fired[0]
        assert "teacher_cls_entropy_frac=0.9995" in fired[0]
        assert detector.update(70, uniform) == []  # once per kind
        collapsed = {**uniform, "teacher_cls_std": 1e-4}
        for step in (80, 90):
            assert detector.update(step, collapsed) == []
        assert "[teacher_cls_std]" in detector.update(100, collapsed)[0]
    assert len([r for r in caplog.records if "training collapse" in r.getMessage()]) == 2
    for quiet in range(20):
        assert CollapseDetector(64).update(quiet, _healthy()) == []
    near_uniform = {**_healthy(), "teacher_cls_entropy_frac": 0.997}  # near uniform rows, informative over the batch
    detector = CollapseDetector(64)
    assert all(detector.update(step, near_uniform) == [] for step in range(10))


def test_uniform_cls_targets_with_close_embeddings_warn_that_the_cls_token_is_not_learning(caplog):
    """cls targets near uniform while the patch targets carry information: silent while the cls embeddings are spread
    (the former demo recipe), a warning once they stay close together (the 64 px digits runs)."""
    spread = {**_healthy(), "teacher_cls_entropy_frac": 0.9999, "teacher_cls_batch_entropy_frac": 0.9999,
              "teacher_patch_entropy_frac": 0.9}
    detector = CollapseDetector(embed_dim=64, patience=2)
    assert all(detector.update(step, spread) == [] for step in range(10)) and detector.fired == []
    close = {**spread, "teacher_cls_std": 0.01}  # under 0.25 / sqrt(64) = 0.031, above the collapse floor 0.006
    detector = CollapseDetector(embed_dim=64, patience=2)
    with caplog.at_level(logging.WARNING, logger="ibot_engine.train.health"):
        fired = [detector.update(step, close) for step in range(6)]
    assert fired[:4] == [[]] * 4 and fired[5] == []  # a window of 5 logging steps, reported once
    assert "[cls_not_learning] the cls token is not learning at step 4" in fired[4][0]
    assert "teacher_cls_std=1.00e-02" in fired[4][0] and len(caplog.records) == 1
    no_patch_term = CollapseDetector(embed_dim=64, patience=2, patch_term=False)
    assert no_patch_term.update(0, spread) == [] and "[uniform]" in no_patch_term.update(1, spread)[0]
    for patch in (math.nan, 0.9995):
        detector = CollapseDetector(embed_dim=64, patience=2)
        both = {**spread, "teacher_patch_entropy_frac": patch}
        assert detector.update(0, both) == [] and "[uniform]" in detector.update(1, both)[0]


def test_the_same_sharp_cls_targets_for_every_image_teach_nothing(caplog):
    """Row entropy well below ln K, but every image gets the same distribution (a centre that lags the teacher's
    common output): no information about the image, so with close embeddings the cls token is not learning; the same
    rows spread over the batch (batch entropy above the rows') are informative and the detector stays silent."""
    same = {**_healthy(), "teacher_cls_entropy_frac": 0.65, "teacher_cls_batch_entropy_frac": 0.65,
            "teacher_cls_std": 0.003, "student_cls_std": 0.005}
    detector = CollapseDetector(embed_dim=192, patience=3)
    with caplog.at_level(logging.WARNING, logger="ibot_engine.train.health"):
        fired = [m for step in range(5) for m in detector.update(step, same)]
    assert any("[cls_not_learning]" in m and "teacher_cls_info_frac=0.0000" in m for m in fired)
    assert any("[teacher_cls_std]" in m for m in fired)  # 0.003 < 0.05 / sqrt(192), uninformative: a collapse too
    informative = {**same, "teacher_cls_batch_entropy_frac": 0.75}  # 0.10 of ln K about the image
    detector = CollapseDetector(embed_dim=192, patience=3)
    assert all(detector.update(step, informative) == [] for step in range(10))


FIXTURES = Path(__file__).parent / "fixtures" / "health"


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.jsonl")))
def test_detector_on_recorded_runs(name):
    """Replays the health metrics of real runs (each file: a header saying what ran, then one record per logging
    step; tests/train/fixtures/health/README.md) through the detector as the trainer sets it up: the kinds it
    reports must be the ones the header expects (the runs whose cls token did not learn, and only them)."""
    header, *records = [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    detector = CollapseDetector(embed_dim=192, start_step=header["steps"] // 10, patch_term=header["patch_term"])
    for record in records:
        detector.update(record["step"], {"teacher_patch_entropy_frac": math.nan, **record})
    assert sorted(detector.fired_kinds) == sorted(header["expect"]), (header["run"], detector.fired)


def test_detector_does_not_watch_the_starting_point():
    uniform = {**_healthy(), "teacher_cls_entropy_frac": 0.9999,  # e.g. LayerScale 1e-5: one output for all images
               "teacher_patch_entropy_frac": 0.9999}
    detector = CollapseDetector(embed_dim=64, patience=2, start_step=30)
    assert [detector.update(step, uniform) for step in (10, 20, 30)] == [[], [], []]  # the streak starts at 30
    assert "step 40" in detector.update(40, uniform)[0]


def test_a_spread_that_is_still_growing_is_the_start_not_a_collapse():
    """LayerScale 1e-5 starts every image at nearly one embedding; the spread then grows through the floor. Teacher
    std (x 1e-3) logged every 10 steps by two runs of the former `digits.yaml` that learned (seed 2: k-NN 57.8%,
    lr 2.5e-4: 50.8%), which fired the std criterion before `STD_GROWTH`; from step 30 (`start_step`, 10% of 300
    steps)."""
    floor = 0.05 / math.sqrt(192)
    for curve in ([0.40, 0.95, 1.78, 3.50, 3.57, 5.01, 7.45], [0.18, 0.59, 1.26, 2.02, 3.06, 3.57, 4.39]):
        detector = CollapseDetector(embed_dim=192, patience=3, start_step=30)
        assert sum(v * 1e-3 < floor for v in curve[2:]) >= 3  # under the floor for 3+ watched steps in a row
        for step, value in zip(range(10, 80, 10), curve):
            assert detector.update(step, {**_near_uniform(), "teacher_cls_std": value * 1e-3}) == []
    # The same spread once it stops growing (or falls, or never moved) is reported, at the step the growth stalls.
    for curve, fires_at in (([1.8, 3.5, 3.5, 3.5, 3.4], 40), ([3.0, 2.5, 2.0], 30), ([0.0, 0.0, 0.0], 30),
                            ([1.0, 1.1, 1.2], 30)):
        detector = CollapseDetector(embed_dim=192, patience=3)
        reported = [(step, detector.update(step, {**_near_uniform(), "teacher_cls_std": value * 1e-3}))
                    for step, value in zip(range(10, 60, 10), curve)]
        fired = [step for step, messages in reported if any("_std]" in m for m in messages)]
        assert fired == [fires_at], curve


def test_detector_with_stop_raises_naming_the_metric():
    detector = CollapseDetector(embed_dim=64, on_collapse="stop", patience=2)
    one_hot = {**_healthy(), "teacher_cls_batch_entropy_frac": 0.01}
    detector.stop_if_asked(detector.update(1, one_hot))
    with pytest.raises(TrainingCollapsedError, match=r"step 2: teacher_cls_batch_entropy_frac=0\.0100"):
        detector.stop_if_asked(detector.update(2, one_hot))


def _constant_teacher(monkeypatch):
    """Force a collapse: the teacher's head gives every image and patch the same logits and its backbone the same
    token."""
    real = ibot_module.IBOT.teacher_forward

    def constant(self, global_crops, mask_indices):
        out = real(self, global_crops, mask_indices)
        return out._replace(cls_logits=torch.zeros_like(out.cls_logits),
                            patch_logits=torch.zeros_like(out.patch_logits), patch_sum=torch.zeros_like(out.patch_sum),
                            cls_tokens=torch.ones_like(out.cls_tokens))

    monkeypatch.setattr(ibot_module.IBOT, "teacher_forward", constant)


def test_a_forced_collapse_is_reported_in_the_log_and_metrics(tmp_path, monkeypatch, caplog):
    _constant_teacher(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ibot_engine.train.health"):
        last = train(tiny_config(f"run.dir={tmp_path}", "train.steps=5"))
    kinds = sorted(m.split("]")[0].strip("[") for m in last["collapse"])
    assert kinds == ["cls_not_learning", "teacher_cls_std", "uniform"]
    collapses = [m for m in last["collapse"] if "cls_not_learning" not in m]
    assert all("step 3" in m for m in collapses)  # patience 3, logging every step
    assert any("step 5" in m for m in last["collapse"] if "cls_not_learning" in m)  # its window: 5 logging steps
    records = read_metrics(tmp_path)
    assert sorted(records[2]["collapse"]) == sorted(collapses) and "collapse" not in records[3]
    assert records[0]["teacher_cls_entropy_frac"] == pytest.approx(1.0, abs=1e-6)
    assert len([r for r in caplog.records if "training collapse" in r.getMessage()]) == 2


def test_on_collapse_stop_ends_the_run_after_writing_the_step(tmp_path, monkeypatch):
    _constant_teacher(monkeypatch)
    cfg = tiny_config(f"run.dir={tmp_path}", "train.steps=6", "train.on_collapse=stop")
    with pytest.raises(TrainingCollapsedError, match=r"uniform|teacher_cls_std"):
        train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step_*"))


def test_health_metrics_in_a_real_run_and_its_plot(tmp_path):
    last = train(tiny_config(f"run.dir={tmp_path}", "train.steps=3",
                                    "loss.koleo_weight=0.1"))
    assert last["collapse"] == []
    for record in read_metrics(tmp_path):
        for key in HEALTH_KEYS:
            assert key in record and (math.isfinite(record[key]) or key.startswith("teacher_patch")), key
        assert 0 < record["teacher_cls_entropy_frac"] <= 1 and 0 < record["student_cls_std"] < 1
        assert math.isfinite(record["loss_koleo"])
        assert record["loss"] == pytest.approx(record["loss_cls"] + record["loss_patch"] + 0.1 * record["loss_koleo"],
                                               rel=1e-5)
    png = plot_health_run(tmp_path)
    assert png == tmp_path / "health.png" and png.stat().st_size > 1000
