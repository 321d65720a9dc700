"""Shared benchmark plumbing: timing, copy bandwidth, peak memory, environment capture and the markdown writer.

Timing on CUDA is `triton.testing.do_bench` with quantiles (0.5, 0.2, 0.8) (Liger's choice); on CPU a plain
`perf_counter` loop, which only exists so that `--device cpu --quick` keeps the scripts from rotting.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: str) -> str:
    """Short card name for file names: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    if device != "cuda":
        return "cpu"
    words = [w for w in device_name(device).lower().replace("-", " ").split() if w not in {"nvidia", "geforce"}]
    return words[0] if words else "gpu"


def environment(device: str, script: str = "ibot_benchmarks.kernels") -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git": git_sha(),
        "command": " ".join([f"python -m {script}", *sys.argv[1:]]),
    }
    if device == "cuda":
        env["cuda"] = str(torch.version.cuda)
    return env


def default_report_path(what: str, device: str) -> Path:
    """`results/<what>_<gpu>_<yyyymm>.md` (style guide B10)."""
    return RESULTS_DIR / f"{what}_{device_slug(device)}_{datetime.datetime.now(datetime.UTC):%Y%m}.md"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_header(title: str, env: dict[str, str]) -> list[str]:
    """The first lines of a benchmark report: its title, then the environment (command in backticks)."""
    lines = [f"# {title}: {env['device']}", ""]
    return lines + [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in env.items()]


def save_report(report: str, what: str, device: str, out: Path | None, quick: bool) -> Path | None:
    """Print `report` and write it to `out`, or to `results/<what>_<gpu>_<yyyymm>.md` for a full CUDA run; a CPU or
    --quick run without `out` is a smoke test and never lands in results/."""
    print(report)
    if out is None and device == "cuda" and not quick:
        out = default_report_path(what, device)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return out
