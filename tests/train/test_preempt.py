"""Stop signals (engine/preempt.py): SIGTERM / SIGUSR1 end the run at a step boundary with one complete checkpoint,
resuming from it equals the uninterrupted run, a signal during a checkpoint write does not interrupt it, and ranks
agree on the step without a per-step host sync. The launcher-level checks (torchrun's agent, a real SLURM job that
requeues itself) are in tests/test_distributed.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ibot_engine.train.loop as train_module
from ibot_engine.checkpoint import Checkpointer, load_consolidated
from ibot_engine.cli import main as cli_main
from ibot_engine.preempt import REQUEUE_EXIT_CODE, Preempted, StopSignal
from ibot_engine.train.loop import train
from tests.helpers import TINY_OVERRIDES, read_metrics, spawn_ranks, tiny_config

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("loss", "loss_cls", "loss_patch", "grad_norm", "lr", "teacher_temp", "momentum")


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """A stopped run leaves its process ignoring stop signals (it is about to exit): not pytest's."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _cfg(run_dir: Path, *extra: str):
    return tiny_config(f"run.dir={run_dir}", "data.builtin_size=40", "train.steps=6", *extra)


def _signal_before_step(monkeypatch, step: int, sig: signal.Signals) -> None:
    """A test hook: this process gets `sig` just before optimizer step `step` runs (a real signal, mid-run)."""
    inner = train_module.train_step

    def train_step(t, *args, **kwargs):
        if t.step + 1 == step:
            os.kill(os.getpid(), sig)
        return inner(t, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", train_step)


def _losses(run_dir: Path) -> list[list[float]]:
    return [[r["step"], *(r[k] for k in KEYS)] for r in read_metrics(run_dir) if "loss" in r]


def _assert_same_final_state(a: Path, b: Path) -> None:
    state_a, state_b = load_consolidated(a)["model"], load_consolidated(b)["model"]
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k


def test_stop_signal_checkpoints_the_step_and_the_rerun_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """SIGUSR1 here; SIGTERM in the tests below (the handler is the same)."""
    sig = signal.SIGUSR1
    extra = ("data.num_workers=2", "checkpoint.every=4")
    train(_cfg(tmp_path / "a", *extra))
    with monkeypatch.context() as m:
        _signal_before_step(m, 3, sig)
        with pytest.raises(Preempted) as stopped:
            train(_cfg(tmp_path / "b", *extra))
    assert stopped.value.step == 3 and stopped.value.signal_name == sig.name  # one rank: stops after this step
    assert signal.getsignal(sig) == signal.SIG_IGN  # a stopped run's process ignores further stop signals
    ckpt = Checkpointer(tmp_path / "b")
    assert ckpt.latest().name == "step_00000003" and load_consolidated(ckpt.latest())["step"] == 3
    records = read_metrics(tmp_path / "b")
    assert records[-1] == {"step": 3, "preempted": {"signal": sig.name, "checkpoint": str(ckpt.latest())}}

    before = signal.getsignal(sig)
    train(_cfg(tmp_path / "b", *extra))  # the same command again: resumes at step 3
    assert signal.getsignal(sig) is before  # a run that ends normally restores the handlers it replaced
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # exact: nothing lost or repeated
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 3, 4, 5, 6]  # the stop record stays
    _assert_same_final_state(tmp_path / "a", tmp_path / "b")


def test_the_cli_exits_with_the_requeue_code_after_a_stop_signal(tmp_path, monkeypatch):
    _signal_before_step(monkeypatch, 2, signal.SIGTERM)
    assert cli_main(["train", *TINY_OVERRIDES, "data.builtin_size=40", "train.steps=6",
                     f"run.dir={tmp_path}"]) == REQUEUE_EXIT_CODE == 75
    assert Checkpointer(tmp_path).latest().name == "step_00000002"


def test_signals_during_a_checkpoint_write_do_not_interrupt_it(tmp_path, monkeypatch):
    """Two signals arrive while DCP writes the step-2 checkpoint: the write completes, the run stops after step 3."""
    import torch.distributed.checkpoint as dcp

    real_write = dcp.FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if ".step_00000002." in str(self.path):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal during the save
        return real_write(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)
    with pytest.raises(Preempted) as stopped:
        train(_cfg(tmp_path / "b", "checkpoint.every=2"))
    assert stopped.value.step == 3
    ckpt = Checkpointer(tmp_path / "b")
    assert [p.name for p in ckpt.checkpoints()] == ["step_00000002", "step_00000003"]
    assert ckpt.latest().name == "step_00000003" and not list(ckpt.dir.glob(".step_*"))
    assert load_consolidated(ckpt.dir / "step_00000002")["step"] == 2  # complete and readable
    monkeypatch.undo()
    train(_cfg(tmp_path / "a", "checkpoint.every=2"))
    train(_cfg(tmp_path / "b", "checkpoint.every=2"))
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_a_kill_during_the_stop_checkpoint_leaves_the_previous_checkpoint_and_latest(tmp_path):
    """A real process: SIGTERM to its whole process group mid-run (as SLURM signals every process of a step: the
    DataLoader workers must shrug it off), a second SIGTERM while the stop checkpoint is being written (it carries
    on), then SIGKILL (a scheduler's grace period ran out): the previous checkpoint and `latest` are intact."""
    marker, run_dir = tmp_path / "writing", tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import torch.distributed.checkpoint as dcp
        from ibot_engine.cli import main
        real_write = dcp.FileSystemWriter.write_data
        def write_data(self, plan, planner):
            if ".step_00000002." in str(self.path):  # the first checkpoint is written normally
                return real_write(self, plan, planner)
            (Path(self.path) / "partial.distcp").write_bytes(b"half a shard")
            Path({str(marker)!r}).touch()
            time.sleep(600)  # killed here, mid-write
        dcp.FileSystemWriter.write_data = write_data
        sys.exit(main(sys.argv[1:]))
    """)
    args = ["train", *TINY_OVERRIDES, "data.builtin_size=40", "train.steps=40", "checkpoint.every=2",
            "data.num_workers=2", f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ckpt = Checkpointer(run_dir)
    try:
        deadline = time.time() + 240
        while ckpt.latest() is None:
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "the run never wrote its first checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader workers
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "the run never started its stop checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # a second signal during the save: caught, the save goes on
        time.sleep(0.5)
        assert proc.poll() is None, "a second signal during the save ended the process"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert "received again: already stopping" in out, out[-4000:]
    assert ckpt.latest().name == "step_00000002", out[-4000:]
    assert [p.name for p in ckpt.checkpoints()] == ["step_00000002"]  # the half-written one is not a checkpoint
    assert load_consolidated(ckpt.latest())["step"] == 2


def _agreement_worker(rank: int, world: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    try:
        stop = StopSignal(world)
        stopped_at = None
        for boundary in range(1, 9):
            if stop.should_stop():
                stopped_at = boundary
                break
            if rank == 1 and boundary == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled, between boundaries 3 and 4
        stop.close()
        seen = stop.signal_name
        Path(out_dir, f"rank{rank}.txt").write_text(f"{stopped_at} {seen}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_agree_on_the_stop_step_when_only_one_is_signalled(tmp_path):
    """Rank 1's flag goes into the all-reduce started at boundary 4 and is read at boundary 5, on both ranks."""
    spawn_ranks(_agreement_worker, 2, str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == "5 none"
    assert (tmp_path / "rank1.txt").read_text() == "5 SIGUSR1"


_LEFTOVER_WORKERS = """
import sys, torch
from ibot_engine import preempt
init = preempt.stop_signal_safe_workers() if sys.argv[1] == "safe" else preempt.ignore_stop_signals
loader = torch.utils.data.DataLoader(range(1000), batch_size=2, num_workers=2, worker_init_fn=init)
batches = iter(loader)
next(batches)  # workers running, the iterator still referenced at exit
print("exiting", flush=True)
"""


@pytest.mark.parametrize("init", ["safe", "ignore-only"])
def test_workers_that_ignore_stop_signals_do_not_hold_up_the_exit(init):
    """multiprocessing ends daemonic children at exit with a SIGTERM, which these workers ignore: without the exit
    hook of `stop_signal_safe_workers` the process would wait for them for ever (the 'ignore-only' case shows it)."""
    proc = subprocess.Popen([sys.executable, "-c", _LEFTOVER_WORKERS, init], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        proc.communicate(timeout=30)  # a normal exit takes a few seconds here; the output is read below
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert "exiting" in out, out
    if init == "safe":
        assert not hung and proc.returncode == 0, out
    else:
        assert hung, "the exit did not wait for the workers: this test no longer shows what the hook prevents"
