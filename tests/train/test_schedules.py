"""Every schedule against its formula (the official `cosine_scheduler` and teacher-temperature linspace)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ibot_engine.config import load_config
from ibot_engine.train.schedules import cosine, hyperparams_at, teacher_temperature, unfreeze_ramp, warmup_cosine


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


RUN_UNIT = ["train.schedule_unit=run", "loss.teacher_temp_per_step=true", "optim.lr=1e-3", "optim.min_lr=1e-6",
            "optim.warmup_epochs=0.1", "optim.freeze_last_layer_epochs=0.05", "loss.warmup_teacher_temp_epochs=0.2",
            "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07"]


@pytest.mark.parametrize(("total", "per_epoch", "batch"), [(300, 22, 64), (2000, 7, 512)])
def test_run_unit_warmups_are_fractions_of_the_run(total, per_epoch, batch):
    cfg = load_config(None, [*RUN_UNIT, f"train.batch_size={batch}"])
    peak = 1e-3 * batch / 256
    warmup, freeze, temp_warmup = round(0.1 * total), 0.05 * total, 0.2 * total

    def hp(step):
        return hyperparams_at(step, cfg, total_steps=total, steps_per_epoch=per_epoch, world_size=1)

    assert hp(0).lr == 0.0
    assert hp(warmup // 2).lr == pytest.approx(peak * (warmup // 2) / (warmup - 1), rel=1e-12)
    assert hp(warmup - 1).lr == pytest.approx(peak, rel=1e-12)
    assert hp(total).lr == pytest.approx(1e-6, rel=1e-9)
    assert hp(int(freeze) - 1).freeze_last_layer and not hp(int(freeze)).freeze_last_layer
    assert hp(0).teacher_temp == pytest.approx(0.04)
    assert hp(int(temp_warmup / 2)).teacher_temp == pytest.approx(0.055, rel=1e-12)
    assert hp(int(temp_warmup)).teacher_temp == pytest.approx(0.07)
    assert hp(int(temp_warmup / 2)).patch_teacher_temp == pytest.approx(0.055, rel=1e-12)
    # the epoch length plays no part: the same steps with another epoch length give the same hyperparameters
    other = hyperparams_at(warmup // 2, cfg, total_steps=total, steps_per_epoch=per_epoch * 3 + 1, world_size=1)
    assert other == hp(warmup // 2)


@pytest.mark.parametrize("batch", [64, 512])
def test_scale_min_lr_gives_a_constant_lr_for_lr_equal_min_lr(batch):
    base = [f"train.batch_size={batch}", "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.warmup_epochs=0"]
    scaled = load_config(None, [*base, "optim.scale_min_lr=true"])
    unscaled = load_config(None, base)
    total, world = 500, 2
    expected = 1e-3 * batch * world / 256
    for step in (0, 1, 137, 250, 499, 500):
        assert hyperparams_at(step, scaled, total, 10, world).lr == expected
    # without the flag min_lr is taken as is, so the lr decays from the scaled peak to 1e-3
    assert hyperparams_at(0, unscaled, total, 10, world).lr == expected
    assert hyperparams_at(total, unscaled, total, 10, world).lr == pytest.approx(1e-3)


def test_backbone_lr_ramps_in_after_the_freeze():
    """train.unfreeze_warmup_steps: 0 while frozen, then (k + 1) / (ramp + 1) for the ramp's k-th step, then 1;
    from step 0 without a freeze, and 1 throughout without a ramp."""
    assert [unfreeze_ramp(s, 3, 4) for s in range(9)] == [0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert [unfreeze_ramp(s, 0, 1) for s in range(3)] == [0.5, 1.0, 1.0]
    assert [unfreeze_ramp(s, 2, 0) for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    cfg = load_config(None, ["train.freeze_backbone_steps=20", "train.unfreeze_warmup_steps=20"])
    hp = [hyperparams_at(s, cfg, 100, 10, 1) for s in (19, 20, 39, 40)]
    assert [h.freeze_backbone for h in hp] == [True, False, False, False]
    assert [h.backbone_lr_factor for h in hp] == pytest.approx([0.0, 1 / 21, 20 / 21, 1.0])
    assert hyperparams_at(5, load_config(None, []), 100, 10, 1).backbone_lr_factor == 1.0
