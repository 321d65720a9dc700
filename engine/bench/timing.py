"""FLOPs, step times, peak memory and peak FLOP/s of a benchmarked step, and its result row.

Timing: CUDA events around every step and one synchronisation at the end (no host sync inside the timed loop);
on CPU `perf_counter` marks (CPU ops are synchronous). Hyperparameters are those of a mid-run step (past every
warm-up and the frozen-last-layer epoch), computed on the host each step as the training loop does.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one whole real step (forward, backward, optimizer, EMA),
run eagerly (`torch.compiler.set_stance("force_eager")`: the math of compiled blocks is the same). It counts
matmuls, convolutions and SDPA; our Triton ops count zero (they hold no matmul). PyTorch has no formula for the CPU
flash-attention op, so one is registered here from its CUDA siblings' formulas. MFU = FLOPs / step time / the
card's dense peak for the autocast dtype (`PEAK_TFLOPS`, or `--peak-tflops`); n/a on CPU unless given.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Dense (no sparsity) peak tensor-core FLOP/s per dtype, from the vendors' data sheets. Matched by substring of
# torch.cuda.get_device_name(), first match wins (so the PCIe and NVL variants precede the SXM default).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


class BenchSetupError(ValueError):
    """A benchmark that cannot start (missing optional package, bad option); the message says what to do."""


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Formulas FlopCounterMode lacks: the CPU flash-attention op and its backward (same math as CUDA's)."""
    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
    return extra


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (forward and backward ops alike), compiled regions run eagerly."""
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else (
        contextlib.nullcontext())
    with stance, FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    step_ms: list[float]  # per timed step
    data_wait_s: float  # host seconds in the data fetch over the timed steps
    wall_s: float  # wall time of the timed steps, final sync included


def time_steps(run: Callable[[int], float], *, steps: int, warmup: int, device: torch.device) -> StepTimes:
    """Run `warmup` then `steps` iterations of `run(i)` (which returns its data-wait seconds), timing each step
    with CUDA events (one sync at the end) or perf_counter marks on CPU."""
    for i in range(warmup):
        run(i)
    synchronize(device)
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    marks = []
    wait = 0.0
    start = time.perf_counter()
    if cuda:
        events[0].record()
    for i in range(steps):
        wait += run(warmup + i)
        if cuda:
            events[i + 1].record()
        else:
            marks.append(time.perf_counter())
    synchronize(device)
    wall = time.perf_counter() - start
    if cuda:
        step_ms = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    else:
        edges = [start, *marks]
        step_ms = [(edges[i + 1] - edges[i]) * 1e3 for i in range(steps)]
    return StepTimes(step_ms, wait, wall)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device, baseline_bytes: int = 0) -> tuple[float, str]:
    """(GiB, what it is): CUDA max_memory_allocated since the last reset minus `baseline_bytes` (memory held by
    something else, e.g. our run before the peer's), or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline_bytes) / 2**30, "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU peak RSS of the whole process"


def precision_name(amp_dtype: torch.dtype | None, device: torch.device) -> str:
    if amp_dtype is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def peak_source(device: torch.device, override_tflops: float | None = None) -> str:
    """Which peak MFU divides by, in words: the `PEAK_TFLOPS` row this card matched, or the override."""
    if override_tflops is not None:
        return f"--peak-tflops {override_tflops}"
    if device.type != "cuda":
        return "none (CPU)"
    name = torch.cuda.get_device_name(device)
    key = next((k for k, _ in PEAK_TFLOPS if k in name), None)
    if key is None:
        return f"none: {name!r} is not in PEAK_TFLOPS (give --peak-tflops)"
    return (f"the data-sheet dense peak of '{key}' ({name}); H100 SXM, H200 and GH200 share it: the same sm_90 tensor "
            "cores at the same clocks (the H200 differs in memory only)")


@torch.no_grad()
def measured_gemm_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                         reps: int = 20) -> float | None:
    """The card's measured ceiling for the step's GEMMs: an n x n x n matmul in `dtype`, best of `reps` timed with
    CUDA events (None off CUDA). Beside the data-sheet peak it says how much of the MFU gap no kernel could close."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        a @ b
        end.record()
    torch.cuda.synchronize(device)
    best_ms = min(start.elapsed_time(end) for start, end in events)
    return 2 * n**3 / (best_ms * 1e-3) / 1e12


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s for `precision` on this device, `override_tflops` if given; None when unknown (CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS:
        if key in name:
            return table[precision] * 1e12
    return None


@dataclass
class BenchRow:
    """One benchmarked step (ours or a peer's); times in ms, memory in GiB."""

    name: str
    batch_size: int
    steps: int
    img_per_s: float
    step_ms_median: float
    step_ms_p10: float
    step_ms_p90: float
    step_ms_min: float
    step_ms_max: float
    data_wait_share: float
    peak_memory_gib: float | None
    peak_memory_kind: str
    flops_per_step: int
    gflop_per_img: float
    achieved_tflops: float
    mfu: float | None


def make_row(name: str, batch_size: int, times: StepTimes, flops: int, peak: float | None,
             memory: tuple[float, str] | None) -> BenchRow:
    ms = sorted(times.step_ms)
    deciles = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else ms * 9
    step_s = sum(ms) / len(ms) / 1e3  # mean step: img/s and MFU are rates over the whole timed window
    return BenchRow(
        name=name, batch_size=batch_size, steps=len(ms), img_per_s=batch_size / step_s,
        step_ms_median=statistics.median(ms), step_ms_p10=deciles[0], step_ms_p90=deciles[8],
        step_ms_min=ms[0], step_ms_max=ms[-1], data_wait_share=times.data_wait_s / times.wall_s,
        peak_memory_gib=memory[0] if memory else None, peak_memory_kind=memory[1] if memory else "n/a",
        flops_per_step=flops, gflop_per_img=flops / batch_size / 1e9, achieved_tflops=flops / step_s / 1e12,
        mfu=flops / step_s / peak if peak else None,
    )


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
