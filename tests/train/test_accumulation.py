"""Exact gradient accumulation: `train.batch_size=4 train.accum_steps=4` is one step on the batch of 16 (losses,
gradient norm, teacher weights, centres), with EMA centres and with Sinkhorn-Knopp targets."""

from __future__ import annotations

import pytest
import torch

from ibot_engine.checkpoint import Checkpointer, load_checkpoint
from ibot_engine.train.loop import train
from tests.helpers import read_metrics, tiny_config

STEPS = 5
# fp32, 5 steps: only the summation order differs (micro-batch sums vs one sum).
TOL = 1e-5
EXACT = ("model.drop_path=0", "loss.koleo_weight=0")  # the two pieces accumulation cannot make exact


def _run(run_dir, *extra):
    train(tiny_config(f"run.dir={run_dir}", f"train.steps={STEPS}", "checkpoint.every=0", *EXACT, *extra))
    return read_metrics(run_dir), load_checkpoint(Checkpointer(run_dir).latest())["model"]


def assert_same_run(a, b, tol: float = TOL) -> None:
    (records_a, state_a), (records_b, state_b) = a, b
    assert [r["step"] for r in records_a] == [r["step"] for r in records_b] == list(range(1, STEPS + 1))
    for ra, rb in zip(records_a, records_b, strict=True):
        for key in ("loss", "loss_cls", "loss_patch", "grad_norm", "lr"):  # not health: the last micro-batch's
            assert rb[key] == pytest.approx(ra[key], abs=tol, rel=tol), (ra["step"], key)
    for key in state_a:
        if key.startswith("teacher.") or key.endswith("_center"):
            torch.testing.assert_close(state_b[key], state_a[key], atol=tol, rtol=0, msg=key)


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_accumulating_four_micro_batches_equals_the_big_batch(tmp_path, centering):
    big = _run(tmp_path / "big", "train.batch_size=16", f"loss.centering={centering}")
    accumulated = _run(tmp_path / "accum", "train.batch_size=4", "train.accum_steps=4",
                       f"loss.centering={centering}")
    assert_same_run(big, accumulated)
    assert accumulated[0][-1]["img_per_s"] > 0 and accumulated[0][0]["epoch"] == pytest.approx(1 / 6)
