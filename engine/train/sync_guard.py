"""`HostSyncGuard`: fail on any operation that would make the host wait for the device, on any device.

On CUDA, reading a device value on the host (`.item()`, `bool(tensor)`, `.tolist()`, a data-dependent output
shape such as `nonzero` or boolean indexing) blocks the CPU until the stream has drained, and a tensor built from
Python data (`torch.tensor([...], device=cuda)`) is a host-to-device copy from pageable memory. Either one in the
training step stalls the launch queue every step. `torch.cuda.set_sync_debug_mode("error")` catches the first kind
on a GPU only; this guard works at the dispatcher, so the rule is checked on CPU tensors too (CI has no GPU):

    with HostSyncGuard():
        train_step(...)          # raises HostSyncError naming the op and the file:line that called it

It flags: `aten._local_scalar_dense` (`.item()`, `bool()`, `float()`), copies from a device to the host (`.cpu()`,
`.tolist()` of a GPU tensor; `.tolist()` of a CPU tensor reads memory without any op, so CPU runs cannot see it),
ops whose output shape depends on the data (`nonzero`, `masked_select`, `unique`, boolean-mask indexing,
`repeat_interleave` without `output_size`), and `aten.lift_fresh` (a tensor made from Python numbers or lists).
Everything else, including `torch.full` / `fill_` with a Python scalar (the value travels as a kernel argument),
passes.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ibot_engine.config import Config
from ibot_engine.distributed import DistEnv
from ibot_engine.precision import autocast_dtype
from ibot_engine.preempt import StopSignal
from ibot_engine.train.schedules import hyperparams_at
from ibot_engine.train.step import train_step
from ibot_engine.train.trainer import build_trainer

_ROOT = Path(__file__).resolve().parents[2]
# Top-level folders whose frames are named: the repository's (editable install) and the installed packages'.
_OURS = ("engine", "kernels", "benchmarks", "tests", "launch", "ibot_engine", "ibot_kernels", "ibot_benchmarks")
_aten = torch.ops.aten

_HOST_READS = {_aten._local_scalar_dense.default: "reads a device value on the host (.item(), bool(), .tolist())",
               _aten.is_nonzero.default: "reads a device value on the host (bool(tensor))",
               _aten.equal.default: "reads a device value on the host (torch.equal)"}
_DATA_DEPENDENT = (_aten.nonzero, _aten.masked_select, _aten.unique_consecutive, _aten._unique2, _aten._unique)
_FROM_PYTHON = (_aten.lift_fresh, _aten.lift_fresh_copy)


class HostSyncError(RuntimeError):
    """A host-device synchronisation inside a guarded region; the message names the op and the calling line."""


def _caller() -> str:
    """The innermost frame of this project's code (engine/, kernels/, benchmarks/), as path:line."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if not path.is_relative_to(_ROOT) or path.name == "sync_guard.py":
            continue
        where = path.relative_to(_ROOT)
        if where.parts[0] in _OURS:
            return f"{where}:{frame.lineno} ({frame.line})"
    return "outside this project's code"


def _why(func: Any, args: tuple, kwargs: dict) -> str | None:
    if func in _HOST_READS:
        return _HOST_READS[func]
    packet = func.overloadpacket
    if packet in _DATA_DEPENDENT:
        return "has an output shape that depends on the data (the host must read it)"
    if packet in _FROM_PYTHON:
        return "builds a tensor from Python data (a host-to-device copy when the target is a GPU)"
    if packet is _aten._to_copy and args[0].device.type != "cpu" and str(kwargs.get("device", "")) == "cpu":
        return "copies a device tensor to the host (.cpu(), .tolist() on a GPU tensor)"
    if packet is _aten.copy_ and args[0].device.type == "cpu" and args[1].device.type != "cpu":
        return "copies a device tensor into host memory"
    if packet is _aten.repeat_interleave and func is _aten.repeat_interleave.Tensor and "output_size" not in kwargs:
        return "repeat_interleave without output_size reads the repeats on the host"
    if packet in (_aten.index, _aten.index_put, _aten.index_put_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype == torch.bool for i in indices):
            return "indexes with a boolean mask (the host must count its True entries)"
    return None


class HostSyncGuard(TorchDispatchMode):
    """Raise `HostSyncError` at the first host-device synchronisation inside the `with` block (see the module
    docstring). `allow` names ops (as `aten.<name>`) to let through, for a region that needs one on purpose."""

    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.allow = set(allow)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        why = _why(func, args, kwargs)
        if why is not None and f"aten.{func.overloadpacket.__name__}" not in self.allow:
            raise HostSyncError(f"{func} {why}, at {_caller()}")
        return func(*args, **kwargs)


def guarded_steps(cfg: Config, env: DistEnv, steps: int = 3, cuda_sync_debug: bool = False) -> float:
    """`steps` real training steps of `cfg` (the second a logging step: health metrics too), each `train_step`
    under `HostSyncGuard` and, with `cuda_sync_debug`, `torch.cuda.set_sync_debug_mode("error")`. Returns the
    last loss (read after the guarded steps); raises `HostSyncError` (or CUDA's error) at the first sync."""
    t = build_trainer(cfg, env)
    t.model.train()
    ema_pairs = t.model.ema_pairs()
    params = [p for p in t.model.student.parameters() if p.requires_grad]
    amp_dtype = autocast_dtype(cfg.precision, env.device)
    data = iter(t.data)
    stop = StopSignal(env.world_size)  # the loop's stop-signal agreement runs under the guard too
    try:
        for step in range(steps):
            hp = hyperparams_at(step, cfg, t.total_steps, t.steps_per_epoch, env.world_size)
            batch = next(data).to(env.device)
            if cuda_sync_debug:
                torch.cuda.set_sync_debug_mode("error")
            try:
                with HostSyncGuard():
                    losses, _, _ = train_step(t, batch, hp, amp_dtype, ema_pairs, params, health=step == 1)
                    stop.should_stop()
            finally:
                if cuda_sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
            t.step = step + 1
        return float(losses.total)
    finally:
        stop.close()
        t.data.close()
