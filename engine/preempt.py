"""Preemption and time limits: a stop signal ends the run at a step boundary with one complete checkpoint.

Schedulers warn a job before they end it: SLURM sends SIGUSR1 `N` seconds before the time limit when asked
(`#SBATCH --signal=B:USR1@N`; launch/slurm.sbatch forwards it to the ranks) and SIGTERM on preemption or
`scancel`; torchrun's agent passes the SIGTERM it gets on to its workers. `ibot train` catches both (`StopSignal`):
the handler only records the signal, so the step in flight (and a checkpoint write in flight) finishes undisturbed,
and a second signal during the save changes nothing. The ranks then agree on the step to stop after, write one
checkpoint of it, and exit with `REQUEUE_EXIT_CODE` (75, EX_TEMPFAIL: "try again later"), which
launch/slurm.sbatch turns into `scontrol requeue`; the next allocation resumes from that checkpoint
(`checkpoint.resume=auto`), so nothing is lost or repeated.

Agreement without a host sync: signals reach the ranks at slightly different times, possibly in different steps.
At every step boundary each rank starts an asynchronous all-reduce of its "signal seen" flag, a CPU tensor on a
gloo group of its own (no device involved, so no host-device synchronisation, and the training's NCCL stream is
untouched), and collects the previous boundary's result, long complete by then. Every rank reads the same sum at
the same boundary, so all stop after the same step: one step after the first rank saw the signal, at most two.

DataLoader workers ignore both signals (`stop_signal_safe_workers`, their `worker_init_fn`): SLURM signals every
process of a step, and torch's workers would otherwise die on SIGTERM and take the run down with them; the training
process shuts them down itself (closing the stream, or killing leftovers at exit).
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist

# torch is imported where it is used: the CLI imports this module for `Preempted` without paying for torch.
log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: stopped early on request, checkpoint written, run me again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """`worker_init_fn` of the training DataLoaders: workers leave stop signals to the training process.

    They then also ignore the SIGTERM with which multiprocessing ends daemonic children at exit (a stream that was
    not closed); `stop_signal_safe_workers` makes the parent kill such leftovers first, so that its exit never waits
    on them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_reaper_registered = False


def stop_signal_safe_workers() -> Callable[[int], None]:
    """The `worker_init_fn` for DataLoaders whose workers must outlive a stop signal (`ignore_stop_signals`);
    registers, once per process, an exit hook that kills the daemonic children (the workers) still running.
    Registered after multiprocessing's own exit hook, it runs before it: atexit runs hooks in reverse order."""
    global _reaper_registered
    if not _reaper_registered:
        atexit.register(_kill_leftover_workers)
        _reaper_registered = True
    return ignore_stop_signals


def _kill_leftover_workers() -> None:
    import multiprocessing

    # DataLoader workers are daemonic; multiprocessing would SIGTERM them, which they ignore. torch's SIGCHLD
    # handler would report each kill as a failed worker: the process is exiting, so the default disposition.
    leftovers = [child for child in multiprocessing.active_children() if child.daemon]
    if leftovers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in leftovers:
        child.kill()
    for child in leftovers:
        child.join(timeout=5)


class Preempted(Exception):  # not an error: the run stopped on request, to be requeued
    """The run stopped on a stop signal after writing the checkpoint of `step`; exit with REQUEUE_EXIT_CODE. The
    process ignores SIGTERM / SIGUSR1 from then on (`StopSignal.ignore_further_signals`)."""

    def __init__(self, step: int, signal_name: str, checkpoint: str) -> None:
        super().__init__(f"stopped on {signal_name} after step {step}; checkpoint {checkpoint} written: run the same "
                         f"command again to resume (exit code {REQUEUE_EXIT_CODE} asks SLURM to requeue the job)")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class StopSignal:
    """Catches SIGTERM / SIGUSR1 for the duration of a run and tells every rank, at the same step boundary, when
    to stop. Call `should_stop()` once per step on every rank (a collective on more than one rank), and `close()`
    at the end (restores the previous handlers, unless `ignore_further_signals` was called: a stopped run)."""

    def __init__(self, world_size: int) -> None:
        self.received: int | None = None  # the first stop signal caught (its number)
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            log.warning("ibot train runs outside the main thread: SIGTERM / SIGUSR1 will not checkpoint the run")
        import torch
        import torch.distributed as dist

        # A gloo group of its own: the flag never touches a GPU, and its async collectives do not interleave with
        # the training group's. Building it is collective (every rank, same point).
        self._group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._seen = self._flag.numpy()  # a view of the reduced flag: read without a tensor op
        self._work: dist.Work | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning("%s received: finishing the step, then writing a checkpoint and stopping",
                        signal.Signals(signum).name)
        else:
            log.warning("%s received again: already stopping after a checkpoint (the save is not interrupted)",
                        signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """Whether every rank stops after the step that just ended. One rank: this rank saw a stop signal. More:
        some rank had seen one by the previous boundary (the all-reduce started there); starts this boundary's."""
        if self._group is None:
            return self.received is not None
        import torch.distributed as dist

        if self._work is not None:
            self._work.wait()  # the previous boundary's reduction: complete, or within one step of it
            self._work = None
            if self._seen[0] > 0:
                return True
        self._flag.fill_(int(self.received is not None))
        self._work = dist.all_reduce(self._flag, group=self._group, async_op=True)
        return False

    def ignore_further_signals(self) -> None:
        """The run is stopping for a requeue: from now on this process ignores stop signals, and `close` leaves
        it so. More are expected before it exits (srun ends the sibling tasks of one that exited with 75 by
        SIGTERM, schedulers repeat themselves), and a default handler would turn exit code 75 into a kill."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def close(self) -> None:
        """Finish the reduction in flight (every rank started it) and restore the previous handlers."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
