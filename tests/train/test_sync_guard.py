"""No host synchronisation in the training step: real steps under `HostSyncGuard` (engine/train/sync_guard.py),
which fails on any device-to-host read, data-dependent shape or tensor built from Python data, on CPU tensors too."""

from __future__ import annotations

import math

import pytest
import torch

from ibot_engine.distributed import DistEnv
from ibot_engine.train.sync_guard import HostSyncError, HostSyncGuard, guarded_steps
from tests.helpers import spawn_ranks, tiny_config


def _guarded_steps(cfg, env: DistEnv) -> None:
    assert math.isfinite(guarded_steps(cfg, env, steps=3))


@pytest.mark.parametrize("extra", [(), ("loss.centering=sinkhorn",), ("loss.koleo_weight=0.1",)],
                         ids=["center", "sinkhorn", "koleo"])
def test_training_step_has_no_host_sync(tmp_path, extra):
    _guarded_steps(tiny_config(f"run.dir={tmp_path}", "train.steps=3", *extra), DistEnv(0, 1, 0, torch.device("cpu")))


def test_the_guard_catches_each_kind_of_sync():
    x = torch.randn(4)
    for make in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.nonzero(), lambda: x[x > 0],
                 lambda: torch.tensor([1.0, 2.0])):
        with pytest.raises(HostSyncError, match=r"test_sync_guard\.py|outside"), HostSyncGuard():
            make()
    with HostSyncGuard():  # what the step may do: scalars as kernel arguments, static shapes
        torch.full((2,), 0.5).fill_(0.25)
        x.nonzero_static(size=4)
        x * 0.5


def _fsdp_worker(rank: int, world: int, out_dir: str) -> None:
    """Guarded steps of FSDP2 at `world` gloo ranks; writes rank<r>.json with the first sync found (or none)."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    try:
        cfg = tiny_config(f"run.dir={out_dir}/run", "train.steps=3", "train.batch_size=4",
                          "distributed.strategy=fsdp")
        error = None
        try:
            _guarded_steps(cfg, DistEnv(rank, world, rank, torch.device("cpu")))
        except HostSyncError as err:
            error = str(err)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"error": error}))
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp_training_step_has_no_host_sync(tmp_path):
    import json

    spawn_ranks(_fsdp_worker, 2, str(tmp_path))
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [{"error": None}] * 2


def test_the_triton_loss_builds_its_temperatures_without_a_host_copy():
    """The Triton loss's (2,) temperature tensor is filled on the device (on a GPU the kernel follows; on CPU the
    step takes the reference path, so the guarded steps above do not reach this code)."""
    from ibot_kernels.ibot_ce.triton import temperature_tensor

    with HostSyncGuard():
        temperatures = temperature_tensor(0.1, 0.04, torch.device("cpu"))
    torch.testing.assert_close(temperatures, torch.tensor([0.1, 0.04]))
