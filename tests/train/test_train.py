"""The training loop end to end on CPU: the loss goes down, resume is bit-exact, failures keep the last good
checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ibot_engine.train.loop as train_module
import ibot_engine.train.step as step_module
from ibot_engine.checkpoint import Checkpointer, load_checkpoint
from ibot_engine.data.synthetic import builtin_dataset
from ibot_engine.train.health import NonFiniteLossError
from ibot_engine.train.loop import train
from tests.helpers import read_metrics, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(run_dir: Path, *extra: str):
    return tiny_config(f"run.dir={run_dir}", *extra)


def test_30_step_run_lowers_the_loss(tmp_path):
    train(_cfg(tmp_path, "train.steps=30", "train.batch_size=16", "optim.lr=2e-2"))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"loss did not go down: first 5 {first:.3f}, last 5 {last:.3f}"
    assert (tmp_path / "config.yaml").is_file()
    assert load_checkpoint(Checkpointer(tmp_path).latest())["step"] == 30


class _StopAfter:
    """Wraps `train_step` to simulate a run killed after `n` steps (raised before step n + 1 changes anything)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.inner = n, 0, train_module.train_step

    def __call__(self, *args, **kwargs):
        if self.calls == self.n:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner(*args, **kwargs)


def _image_folder(root: Path, count: int) -> Path:
    """`count` PNGs of the built-in shapes in class sub-folders: an image folder as a user has one."""
    shapes = builtin_dataset("builtin:shapes", count, "train")
    for index in range(count):
        image, label = shapes[index]
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class{label}" / f"{index:03d}.png")
    return root


@pytest.mark.parametrize("workers,source", [(0, "builtin"), (2, "builtin"), (2, "folder+gpu-augment")])
def test_stop_and_resume_equals_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch, workers, source):
    """Also with the GPU augmenter on an image folder: its batched crops run on CPU tensors here."""
    data = ("data.builtin_size=40",)
    if source == "folder+gpu-augment":
        data = (f"data.path={_image_folder(tmp_path / 'images', 40)}", "data.augment=gpu")
    extra = ("train.steps=8", "checkpoint.every=4", f"data.num_workers={workers}", *data)
    train(_cfg(tmp_path / "a", *extra))
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_step", _StopAfter(5))  # checkpoint at 4, killed during step 6
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tmp_path / "b", *extra))
    train(_cfg(tmp_path / "b", *extra))  # checkpoint.resume=auto picks up step 4

    a = read_metrics(tmp_path / "a")
    b = read_metrics(tmp_path / "b")  # the resumed run replaced the records past its checkpoint
    keys = ("loss", "loss_cls", "loss_patch", "grad_norm", "lr", "teacher_temp", "momentum")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]  # exact equality
    state_a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000008")["model"]
    state_b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000008")["model"]
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = step_module.ibot_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] >= 5:
            return out._replace(total=out.total * float("nan"))
        return out

    monkeypatch.setattr(step_module, "ibot_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at or before step 6.*step_00000004\b"):
        train(_cfg(tmp_path, "train.steps=10", "train.log_every=3", "checkpoint.every=2"))
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest().name == "step_00000004"
    state = load_checkpoint(ckpt.latest())
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # The default train.on_nonfinite=rollback tried train.max_rollbacks=3 times first (every retry failed too).
    assert [r["rollback"]["count"] for r in read_metrics(tmp_path) if "rollback" in r] == [1, 2, 3]


def _poison_calls(monkeypatch, calls_to_poison):
    """A test hook: the loss of the `train_step` calls whose number (from 1) is in `calls_to_poison` becomes NaN."""
    real_loss, calls = step_module.ibot_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        return out._replace(total=out.total * float("nan")) if calls["n"] in calls_to_poison else out

    monkeypatch.setattr(step_module, "ibot_loss", poisoned)


def test_one_non_finite_loss_rolls_back_skips_its_batches_and_finishes(tmp_path, monkeypatch):
    _poison_calls(monkeypatch, {5})  # step 5's loss; seen at step 6 (a log and checkpoint step)
    train(_cfg(tmp_path, "train.steps=10", "train.log_every=3", "checkpoint.every=2"))
    records = read_metrics(tmp_path)
    rollbacks = [r for r in records if "rollback" in r]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 4
    assert rollbacks[0]["rollback"]["failed_step"] == 6 and rollbacks[0]["rollback"]["skipped_batches"] == 2
    assert rollbacks[0]["rollback"]["checkpoint"].endswith("step_00000004")
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 9, 10]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    final = Checkpointer(tmp_path).latest()
    assert final.name == "step_00000010"
    state = load_checkpoint(final)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # 12 batches per epoch (96 images / 8): 10 steps + the 2 skipped batches end exactly one epoch.
    assert json.loads((final / "meta.json").read_text())["data"] == {"epoch": 1, "batch": 0}


def test_non_finite_loss_with_on_nonfinite_stop_stops_at_once(tmp_path, monkeypatch):
    _poison_calls(monkeypatch, {5})
    with pytest.raises(NonFiniteLossError, match=r"step 6; stopping \(train\.on_nonfinite=stop\).*step_00000004\b"):
        train(_cfg(tmp_path, "train.steps=10", "train.log_every=3", "checkpoint.every=2", "train.on_nonfinite=stop"))
    assert not any("rollback" in r for r in read_metrics(tmp_path))


def test_checkpoint_killed_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from ibot_engine.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r})
        ckpt.save(1, {{"step": 1, "w": torch.ones(1000)}})
        real_save = torch.save
        def slow_save(obj, f):
            f.write(b"partial checkpoint bytes" * 1000)
            f.flush()
            Path({str(marker)!r}).touch()
            time.sleep(600)  # killed here, mid-write
        torch.save = slow_save
        ckpt.save(2, {{"step": 2, "w": torch.zeros(1000)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "writer exited before the kill"
            assert time.time() < deadline, "writer never reached the save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest().name == "step_00000001.pt"
    assert [p.name for p in ckpt.checkpoints()] == ["step_00000001.pt"]
    state = load_checkpoint(ckpt.latest())
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))


@pytest.mark.parametrize(
    "options",
    [
        ("loss.centering=sinkhorn", "mask.variant=dinov2", "loss.patch_center=masked"),
        ("optim.clip_mode=per_param", "optim.freeze_last_layer_epochs=1", "loss.teacher_temp_per_step=true",
         "model.norm_last_layer=true", "model.layerscale=1e-5"),
    ],
)
def test_training_options_run(tmp_path, options):
    last = train(_cfg(tmp_path, "train.steps=3", *options))
    assert last["step"] == 3 and torch.isfinite(torch.tensor(last["loss"]))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_metadata_is_refused_not_executed(tmp_path):
    """DCP's .metadata is a pickle: loading a checkpoint must not run the code a crafted one carries."""
    import pickle

    from ibot_engine.checkpoint import load_consolidated

    train(_cfg(tmp_path, "train.steps=2", "checkpoint.every=2"))
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert load_consolidated(ckpt)["model"]  # the genuine index loads with the restricted unpickler
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match="not DCP metadata"):
        load_consolidated(ckpt)
    with pytest.raises(ValueError, match="not DCP metadata"):
        train(_cfg(tmp_path, "train.steps=4"))  # resume goes through the same reader
    assert not marker.exists()


def test_fsdp_in_one_process_with_async_save_saves_and_resumes(tmp_path, monkeypatch):
    """FSDP2 in one process makes a one-rank group (NCCL on a GPU): the async save gets its own gloo group there
    too, and a stopped run resumes from its async checkpoint to the uninterrupted run's losses and weights."""
    import torch.distributed as dist

    from ibot_engine.checkpoint import ShardedCheckpointer

    groups = []
    real_init = ShardedCheckpointer.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        groups.append(self._group)

    monkeypatch.setattr(ShardedCheckpointer, "__init__", recording_init)
    extra = ("train.steps=6", "checkpoint.every=2", "distributed.strategy=fsdp", "checkpoint.async_save=true")
    train(_cfg(tmp_path / "a", *extra))
    assert groups and groups[-1] is not None and not dist.is_initialized()  # its own group, torn down at the end
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_step", _StopAfter(3))  # checkpoint at 2, killed during step 4
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tmp_path / "b", *extra))
    train(_cfg(tmp_path / "b", *extra))
    keys = ("loss", "loss_cls", "loss_patch", "grad_norm")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    state_a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000006")["model"]
    state_b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000006")["model"]
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k


def test_a_run_starts_from_given_weights_in_place_of_its_draw(tmp_path):
    """`train(cfg, initial_state=...)` / `build_trainer`: the model starts from those weights (a paired comparison
    with another implementation's draw, benchmarks/peer_learning.py --ours-init lightly), not from the seed's."""
    from ibot_engine.distributed import DistEnv
    from ibot_engine.model.ibot import IBOT
    from ibot_engine.train.trainer import build_trainer

    cfg = _cfg(tmp_path, "train.steps=1")
    torch.manual_seed(123)  # another draw than train.seed's
    given = {k: v.clone() for k, v in IBOT(cfg.model, cfg.loss).state_dict().items()}
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    own = build_trainer(cfg, env).model.state_dict()
    started = build_trainer(cfg, env, initial_state=given).model.state_dict()
    assert started.keys() == given.keys()
    assert all(torch.equal(started[k], given[k]) for k in given)
    assert not torch.equal(own["student.backbone.pos_embed"], given["student.backbone.pos_embed"])
