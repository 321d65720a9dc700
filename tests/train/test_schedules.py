"""Every schedule against its formula (the official `cosine_scheduler` and teacher-temperature linspace)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ibot_engine.config import load_config
from ibot_engine.train.schedules import cosine, hyperparams_at, teacher_temperature, warmup_cosine


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Port of bytedance/ibot utils.cosine_scheduler."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize(("epochs", "niter", "warmup"), [(20, 7, 3), (5, 11, 0), (100, 3, 10)])
def test_lr_and_momentum_match_official_scheduler(epochs, niter, warmup):
    total = epochs * niter
    lr_ref = official_cosine_scheduler(2e-3, 1e-6, epochs, niter, warmup)
    mom_ref = official_cosine_scheduler(0.996, 1.0, epochs, niter)
    for step in (0, 1, warmup * niter - 1, warmup * niter, total // 2, total - 1):
        if step < 0:
            continue
        assert math.isclose(warmup_cosine(step, total, warmup * niter, 2e-3, 1e-6), lr_ref[step], rel_tol=1e-9,
                            abs_tol=1e-15)
        assert math.isclose(cosine(step, total, 0.996, 1.0), mom_ref[step], rel_tol=1e-12)


def test_weight_decay_and_momentum_endpoints():
    assert cosine(0, 1000, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(500, 1000, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(1000, 1000, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(0, 1000, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine(500, 1000, 0.996, 1.0) == pytest.approx(0.998)


def test_teacher_temperature_official_per_epoch():
    ref = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))  # official teacher_temp_schedule
    for epoch in (0, 1, 15, 28, 29, 30, 99):
        for within in (0, 9):
            got = teacher_temperature(epoch * 10 + within, 10, 30, 0.04, 0.07, per_step=False)
            assert got == pytest.approx(ref[epoch], rel=1e-12)


def test_teacher_temperature_per_step():
    assert teacher_temperature(0, 10, 30, 0.04, 0.07, per_step=True) == pytest.approx(0.04)
    assert teacher_temperature(150, 10, 30, 0.04, 0.07, per_step=True) == pytest.approx(0.055)
    assert teacher_temperature(300, 10, 30, 0.04, 0.07, per_step=True) == pytest.approx(0.07)


def test_hyperparams_at_uses_linear_scaling_and_freezes_last_layer_first_epoch():
    cfg = load_config(None, ["train.batch_size=64", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=1"])
    hp0 = hyperparams_at(0, cfg, total_steps=100, steps_per_epoch=10, world_size=4)
    hp_peak = hyperparams_at(9, cfg, total_steps=100, steps_per_epoch=10, world_size=4)
    hp_late = hyperparams_at(10, cfg, total_steps=100, steps_per_epoch=10, world_size=4)
    assert hp0.lr == 0.0 and hp0.freeze_last_layer
    assert hp_peak.lr == pytest.approx(5e-4 * 64 * 4 / 256)
    assert not hp_late.freeze_last_layer
