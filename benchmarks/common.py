"""Shared plumbing of the benchmark scripts: timing, copy bandwidth, peak memory, the repository's presets. Their
reports' header, tables and paths come from `ibot_engine.bench.report`, shared with `ibot bench` and `ibot profile`.

Timing on CUDA is `triton.testing.do_bench` with quantiles (0.5, 0.2, 0.8) (Liger's choice); on CPU a plain
`perf_counter` loop, which only exists so that `--device cpu --quick` keeps the scripts from rotting.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)
REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when the scripts run from one (editable install)


def repo_file(relative: str) -> Path:
    """A file of the repository (a preset under launch/configs/, say): beside these scripts in a checkout, else under
    the current directory (a non-editable install runs them from a checkout's root). One error names both places."""
    for base in (REPO_ROOT, Path.cwd()):
        if (base / relative).is_file():
            return base / relative
    raise FileNotFoundError(f"{relative} is in neither {REPO_ROOT} nor {Path.cwd()}: run the benchmark scripts from "
                            "a checkout of the repository (its root as the current directory)")


@dataclass(frozen=True, slots=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def bench(
    fn: Callable[[], object], device: str, grad_to_none: Sequence[torch.Tensor] = (), quick: bool = False
) -> Timing:
    """Time `fn` (already warmed up or not: both paths warm up first)."""
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(
            fn,
            warmup=5 if quick else 25,
            rep=20 if quick else 100,
            grad_to_none=list(grad_to_none) or None,
            quantiles=list(QUANTILES),
        )
        return Timing(*ms)
    times = []
    for i in range(2 + (3 if quick else 20)):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        if i >= 2:  # two warm-up calls
            times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7])


def peak_extra_memory(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated by one call of `fn` at its peak, above what was allocated before (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    numel = (1 << 22) if quick else (1 << 28)  # 16 MiB / 1 GiB of fp32
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    timing = bench(lambda: dst.copy_(src), device, quick=quick)
    return 2 * src.numel() * src.element_size() / (timing.median_ms * 1e-3) / 1e9
