"""Backend choice for every op in `kernels`: Triton or the plain PyTorch reference.

`IBOT_KERNELS` is read once at import: `auto` (default), `triton` or `reference`.

* `reference`: never Triton.
* `auto`: Triton iff triton imports and every tensor is on CUDA, or `TRITON_INTERPRET=1` (then CPU tensors run
  the interpreted kernel); otherwise the reference, silently.
* `triton`: the same condition, but failing it raises `RuntimeError` naming the reason (an explicit request
  re-raises, an automatic one falls back, as Liger-Kernel does).

`force_backend()` changes the choice for tests and benchmarks; nothing else does. The backend chosen for each op
is logged once.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from types import ModuleType

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")


def _read_env() -> str:
    value = os.environ.get("IBOT_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"IBOT_KERNELS={value!r} is not one of {BACKENDS}")
    return value


_backend = _read_env()
_logged: set[str] = set()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def optional_module(name: str) -> ModuleType | None:
    """Import a Triton module, or None where triton is not installed (macOS, Windows, CPU-only wheels)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:  # only a missing triton is tolerated; other errors surface
        if "triton" not in str(err):
            raise
        log.debug("kernels: %s unavailable (%s)", name, err)
        return None


def current_backend() -> str:
    return _backend


@contextlib.contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Use `backend` (auto | triton | reference) inside the block."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    previous, _backend = _backend, backend
    try:
        yield
    finally:
        _backend = previous


def _triton_blocker(module: ModuleType | None, tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why Triton cannot run on these tensors, or None when it can."""
    if module is None:
        return "triton is not installed"
    if interpreter_enabled():
        if any(t.is_cuda for t in tensors):
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        return None
    if not all(t.is_cuda for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        return f"tensors on {devices}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
    return None


def use_triton(op: str, module: ModuleType | None, *tensors: torch.Tensor) -> bool:
    """Decide the backend of one call of `op` (see the module docstring)."""
    if _backend == "reference":
        choice = False
    else:
        reason = _triton_blocker(module, tensors)
        if reason is not None and _backend == "triton":
            raise RuntimeError(f"kernels: Triton was forced (IBOT_KERNELS=triton) for {op}, but {reason}")
        choice = reason is None
    key = f"{op}:{choice}"
    if key not in _logged:
        _logged.add(key)
        log.info("kernels: %s uses the %s backend", op, "triton" if choice else "reference")
    return choice
