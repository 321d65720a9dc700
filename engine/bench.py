"""`ibot bench`: images/s, step time, MFU and peak memory of the real training step, optionally beside lightly's.

    ibot bench --config launch/configs/vit_s16.yaml train.batch_size=64 --steps 30 --warmup 5 --compare lightly

What runs is `engine.train.build_trainer` + `engine.train.train_step`, the loop's own step, on:
* synthetic batches (default): a few `Batch`es made once on the device before timing (random crops at the
  configured sizes, masks from `engine.data.masking.generate_masks`, made outside the step as a loader would),
  cycled; the trainer is built on a tiny lazily rendered built-in dataset that is never read;
* the configured data stream with `--data` (`data.path` / `data.shards`): the host time spent in
  `next(data_iter)` + `.to(device)` is measured on its own and reported as the data-wait share of the wall time.

Timing: CUDA events around every step and one synchronisation at the end (no host sync inside the timed loop);
on CPU `perf_counter` marks (CPU ops are synchronous). Hyperparameters are those of a mid-run step (past every
warm-up and the frozen-last-layer epoch), computed on the host each step as the training loop does.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one whole real step (forward, backward, optimizer, EMA),
run eagerly (`torch.compiler.set_stance("force_eager")`: the math of compiled blocks is the same). It counts
matmuls, convolutions and SDPA; our Triton ops count zero (they hold no matmul). PyTorch has no formula for the CPU
flash-attention op, so one is registered here from its CUDA siblings' formulas. MFU = FLOPs / step time / the
card's dense peak for the autocast dtype (`PEAK_TFLOPS`, or `--peak-tflops`); n/a on CPU unless given.

`--find-max-batch`: the largest per-process batch whose full step runs without `torch.OutOfMemoryError`, by
doubling from `train.batch_size` then bisection (`find_max_batch`, pure search over a "try batch b" callable);
`--max-batch` caps it (needed on CPU, where nothing runs out of memory).

Under torchrun (`distributed.strategy=ddp|fsdp`) every rank runs the harness and reports its own img/s; rank 0
writes the report. `--find-max-batch` is single-process only.

`StepHarness` is shared with `ibot profile` (engine/profile.py).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from engine.config import Config, config_to_dict
from engine.data.loader import Batch
from engine.data.masking import generate_masks, masked_token_indices
from engine.distributed import DistEnv, init_distributed, teardown
from engine.schedules import Hyperparams, hyperparams_at
from engine.train import Trainer, autocast_dtype, build_trainer, train_step

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
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
# A mid-run step: past the lr / teacher-temperature warm-ups and the frozen last layer (whatever the config's
# epochs), so the optimizer updates every parameter as in most of a run.
_NOMINAL_STEPS_PER_EPOCH = 1000
_NOMINAL_TOTAL_STEPS = 200 * _NOMINAL_STEPS_PER_EPOCH
_BENCH_STEP = _NOMINAL_TOTAL_STEPS // 2


class BenchSetupError(ValueError):
    """A benchmark that cannot start (missing optional package, bad option); the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------
# The step harness (shared with engine/profile.py)


def synthetic_batches(cfg: Config, device: torch.device, *, batch_size: int, num_batches: int, rank: int = 0,
                      seed: int = 0) -> list[Batch]:
    """`num_batches` training batches on `device`: random crops at the configured sizes and real block masks."""
    d, G, L = cfg.data, cfg.data.num_global, cfg.data.num_local
    grid = (d.global_size // cfg.model.patch_size, d.global_size // cfg.model.patch_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    batches = []
    for i in range(num_batches):
        masks = generate_masks(cfg.mask, grid, seed=seed, epoch=0, batch=i, rank=rank,
                               indices=range(i * batch_size, (i + 1) * batch_size), num_views=G)
        mask_indices, mask_weights = masked_token_indices(masks)
        batches.append(Batch(
            global_crops=torch.randn(G * batch_size, 3, d.global_size, d.global_size, device=device, generator=gen),
            local_crops=torch.randn(L * batch_size, 3, d.local_size, d.local_size, device=device, generator=gen),
            masks=masks.to(device), mask_indices=mask_indices.to(device), mask_weights=mask_weights.to(device),
            labels=torch.full((batch_size,), -1, dtype=torch.int64, device=device),
            indices=torch.arange(i * batch_size, (i + 1) * batch_size, device=device),
        ))
    return batches


def _synthetic_build_config(cfg: Config, run_dir: str) -> Config:
    """The config `build_trainer` gets when batches are synthetic: same model, optimizer and strategy, and a
    lazily rendered built-in dataset of one global batch that is never read (no files, no workers)."""
    build = copy.deepcopy(cfg)
    build.data.path, build.data.shards, build.data.augment = "builtin:patterns", "", "cpu"
    build.data.num_workers = 0
    build.data.builtin_size = cfg.train.batch_size * 64  # >= one global batch for any world size up to 64
    build.run.dir = run_dir
    return build


@dataclass
class StepHarness:
    """The real trainer and step for one config; `run(i)` is one loop iteration (batch fetch + `train_step`)."""

    cfg: Config
    env: DistEnv
    trainer: Trainer
    amp_dtype: torch.dtype | None
    batches: list[Batch] | None  # synthetic batches on the device, or None: the trainer's data stream
    _data_iter: Iterator[Batch] | None = None
    _ema_pairs: Any = None
    _params: list[torch.Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.cfg.train.batch_size

    def __post_init__(self) -> None:
        self._ema_pairs = self.trainer.model.ema_pairs()
        self._params = [p for p in self.trainer.model.student.parameters() if p.requires_grad]
        self.trainer.model.train()
        if self.batches is None:
            self._data_iter = iter(self.trainer.data)

    def hyperparams(self, i: int) -> Hyperparams:
        return hyperparams_at(_BENCH_STEP + i, self.cfg, _NOMINAL_TOTAL_STEPS, _NOMINAL_STEPS_PER_EPOCH,
                              self.env.world_size)

    def next_batch(self, i: int) -> Batch:
        if self.batches is not None:
            return self.batches[i % len(self.batches)]
        assert self._data_iter is not None
        return next(self._data_iter).to(self.env.device)

    def step(self, batch: Batch, i: int) -> None:
        train_step(self.trainer, batch, self.hyperparams(i), self.amp_dtype, self._ema_pairs, self._params)

    def run(self, i: int) -> float:
        """One iteration; returns the host seconds spent getting the batch (the data wait)."""
        start = time.perf_counter()
        batch = self.next_batch(i)
        wait = time.perf_counter() - start
        self.step(batch, i)
        return wait


def build_harness(cfg: Config, env: DistEnv, *, real_data: bool = False, num_batches: int = 4,
                  run_dir: str | None = None) -> StepHarness:
    """Build the trainer of `cfg` (engine.train.build_trainer) and its batches."""
    if real_data:
        trainer = build_trainer(cfg, env)
        batches = None
    else:
        # The trainer's checkpointer gets a run directory that is gone after the build: a benchmark never saves.
        with tempfile.TemporaryDirectory(prefix="ibot_bench_") as tmp:
            trainer = build_trainer(_synthetic_build_config(cfg, run_dir or tmp), env)
        trainer.cfg = cfg
        batches = synthetic_batches(cfg, env.device, batch_size=cfg.train.batch_size, num_batches=num_batches,
                                    rank=env.rank, seed=cfg.train.seed)
    return StepHarness(cfg, env, trainer, autocast_dtype(cfg.precision, env.device), batches)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, timing, memory


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


def bench_harness(h: StepHarness, *, steps: int, warmup: int, peak: float | None) -> BenchRow:
    """FLOPs of one real step, then warm-up and timed steps of `h`."""
    device = h.env.device
    flops = count_flops(lambda: h.run(0))
    reset_peak_memory(device)
    times = time_steps(h.run, steps=steps, warmup=warmup, device=device)
    return make_row("ibot-engine", h.batch_size, times, flops, peak, peak_memory_gib(device))


# ----------------------------------------------------------------------------------------------------------------
# Largest batch


def find_max_batch(try_batch: Callable[[int], object], start: int, cap: int | None = None) -> int:
    """The largest batch b <= cap for which `try_batch(b)` returns without `torch.OutOfMemoryError`.

    Doubles from `start` until a try fails (or the cap runs), then bisects between the last success and the
    first failure. Assumes fitting is monotone in b. Returns 0 when even batch 1 does not fit.
    """
    if start < 1 or (cap is not None and cap < 1):
        raise ValueError(f"find_max_batch: start {start} and cap {cap} must be >= 1")

    def fits(b: int) -> bool:
        try:
            try_batch(b)
        except torch.OutOfMemoryError:
            log.info("find-max-batch: batch %d: out of memory", b)
            return False
        log.info("find-max-batch: batch %d fits", b)
        return True

    lo, hi = 0, None  # largest known fit, smallest known failure
    b = min(start, cap) if cap is not None else start
    while hi is None:
        if fits(b):
            lo = b
            if cap is not None and b >= cap:
                return lo
            b = min(2 * b, cap) if cap is not None else 2 * b
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def harness_batch_trier(h: StepHarness, steps: int = 2) -> Callable[[int], None]:
    """`try_batch(b)` for `find_max_batch`: `steps` real steps of `h`'s trainer on synthetic batches of size b.
    The model and optimizer are kept (their size does not depend on b); batches and gradients are rebuilt."""

    def try_batch(b: int) -> None:
        h.trainer.optimizer.zero_grad(set_to_none=True)
        free_device_memory(h.env.device)
        try:
            batches = synthetic_batches(h.cfg, h.env.device, batch_size=b, num_batches=1, rank=h.env.rank,
                                        seed=h.cfg.train.seed)
            for i in range(steps):
                h.step(batches[0], i)
            synchronize(h.env.device)  # an asynchronous OOM surfaces here at the latest
        finally:
            batches = None
            h.trainer.optimizer.zero_grad(set_to_none=True)
            states = getattr(h.trainer.scaler, "_per_optimizer_states", None)
            if h.trainer.scaler.is_enabled() and states is not None:
                states.clear()  # fp16: a step cut short by OOM leaves the scaler mid-step ("already unscaled")
            free_device_memory(h.env.device)

    return try_batch


# ----------------------------------------------------------------------------------------------------------------
# Report


def environment(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {
        "card": card,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "n/a (CPU run)",
        "python": platform.python_version(),
        "git": sha,
    }


def relevant_config(cfg: Config) -> dict[str, Any]:
    """The config keys that decide the step's cost (and any attention / kernel settings the config has)."""
    d = config_to_dict(cfg)
    model = d["model"]
    out = {
        "model.arch": model["arch"], "model.patch_size": model["patch_size"], "model.out_dim (K)": model["out_dim"],
        "model.head_hidden_dim": model["head_hidden_dim"], "model.head_bottleneck_dim": model["head_bottleneck_dim"],
        "train.batch_size": d["train"]["batch_size"], "train.compile": d["train"]["compile"],
        "data.global_size": d["data"]["global_size"], "data.num_global": d["data"]["num_global"],
        "data.local_size": d["data"]["local_size"], "data.num_local": d["data"]["num_local"],
        "mask.variant": d["mask"]["variant"], "loss.patch_center": d["loss"]["patch_center"],
        "loss.centering": d["loss"]["centering"], "optim.clip_mode": d["optim"]["clip_mode"],
        "precision": d["precision"], "distributed.strategy": d["distributed"]["strategy"],
    }
    speed = {"model": ("attention", "sdpa_backend", "pack_crops", "drop_path_impl", "norm_impl", "drop_path"),
             "optim": ("impl",), "train": ("compile_mode", "activation_checkpointing")}
    for section, keys in speed.items():  # the kernels and memory options (README "Speed and memory options")
        for key in keys:
            out[f"{section}.{key}"] = d[section][key]
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def results_table(rows: Sequence[BenchRow]) -> str:
    header = ["step", "batch", "img/s", "step ms median", "p10 / p90", "min / max", "peak GiB", "GFLOP/img",
              "TFLOP/s", "MFU", "data wait"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r.name, str(r.batch_size), _fmt(r.img_per_s, ".1f"), _fmt(r.step_ms_median, ".2f"),
                 f"{r.step_ms_p10:.2f} / {r.step_ms_p90:.2f}", f"{r.step_ms_min:.2f} / {r.step_ms_max:.2f}",
                 _fmt(r.peak_memory_gib, ".2f"), _fmt(r.gflop_per_img, ".2f"), _fmt(r.achieved_tflops, ".3g"),
                 "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%", f"{100 * r.data_wait_share:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_out_path(cfg: Config, device: torch.device) -> Path:
    slug = "cpu"
    if device.type == "cuda":
        words = [w for w in torch.cuda.get_device_name(device).lower().replace("-", " ").split()
                 if w not in {"nvidia", "geforce"}]
        slug = words[0] if words else "gpu"
    day = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    name = f"bench_{cfg.model.arch}{cfg.model.patch_size}_b{cfg.train.batch_size}_{slug}_{day}.md"
    return REPO_ROOT / "benchmarks" / "results" / name


def write_report(path: Path, *, env_info: dict[str, str], command: str, cfg: Config, rows: Sequence[BenchRow],
                 extra: dict[str, Any], notes: Sequence[str]) -> Path:
    """The markdown report at `path` and its JSON sidecar (same name, .json) with the raw numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# ibot bench", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env_info.items()]
    lines += ["", "Command:", "", f"    {command}", "", "Config (resolved, the keys that set the step's cost):", ""]
    lines += ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in relevant_config(cfg).items()]
    lines += ["", "## Result", "", results_table(rows), ""]
    for key, value in extra.items():
        lines.append(f"- {key}: {value}")
    lines += [f"- {note}" for note in notes]
    path.write_text("\n".join(lines) + "\n")
    sidecar = {"environment": env_info, "command": command, "config": config_to_dict(cfg),
               "rows": [asdict(r) for r in rows], **extra, "notes": list(notes)}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# `ibot bench`


def bench_main(args: Any, cfg: Config) -> Path | None:
    """`ibot bench` (args from engine/cli.py); returns the report path (rank 0) or None."""
    if args.steps < 1 or args.warmup < 0:
        raise BenchSetupError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} / {args.warmup}")
    if args.max_batch is not None and args.max_batch < 1:
        raise BenchSetupError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.find_max_batch and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BenchSetupError("--find-max-batch runs in one process (ranks would run out of memory at different "
                              "tries); run it without torchrun")
    peer = None
    if args.compare == "lightly":
        from engine.bench_lightly import require_lightly

        require_lightly()  # before any expensive work
    env = init_distributed()
    try:
        device = env.device
        command = "ibot " + shlex.join(sys.argv[1:] if getattr(args, "argv", None) is None else args.argv)
        h = build_harness(cfg, env, real_data=args.data, num_batches=args.num_batches)
        precision = precision_name(h.amp_dtype, device)
        peak = peak_flops(device, precision, args.peak_tflops)
        rows = [bench_harness(h, steps=args.steps, warmup=args.warmup, peak=peak)]
        extra: dict[str, Any] = {"precision": precision, "peak_flops_used": peak,
                                 "data": "configured data stream (--data)" if args.data else "synthetic, on device"}
        notes = []
        if args.find_max_batch:
            extra["largest_batch_ibot_engine"] = find_max_batch(harness_batch_trier(h), cfg.train.batch_size,
                                                                args.max_batch)
        del h
        free_device_memory(device)
        if args.compare == "lightly":
            from engine.bench_lightly import LightlyStep

            baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            peer = LightlyStep(cfg, device, batch_size=cfg.train.batch_size, amp_dtype=autocast_dtype(
                cfg.precision, device), num_batches=args.num_batches)
            rows.append(peer.bench(steps=args.steps, warmup=args.warmup, peak=peak, baseline_bytes=baseline))
            if args.find_max_batch:
                extra["largest_batch_lightly"] = find_max_batch(peer.batch_trier(), cfg.train.batch_size,
                                                                args.max_batch)
            ours, theirs = rows
            extra["ratio_img_per_s (ours / lightly)"] = round(ours.img_per_s / theirs.img_per_s, 3)
            if device.type == "cuda":
                extra["ratio_peak_memory (ours / lightly)"] = round(ours.peak_memory_gib / theirs.peak_memory_gib, 3)
            else:
                notes.append("CPU: peak memory is the process's peak RSS, which both rows share; no memory ratio")
            notes.append(f"lightly row: {peer.description}")
        if device.type != "cuda":
            notes.append("CPU run: numbers say the harness works, nothing about GPU speed; MFU needs --peak-tflops")
        if args.find_max_batch and args.max_batch is not None:
            notes.append(f"largest batch searched up to --max-batch {args.max_batch}")
        notes.append("img/s is per process; step ms from "
                     + ("CUDA events, one sync at the end" if device.type == "cuda" else "perf_counter marks"))
        print(results_table(rows))
        for key, value in extra.items():
            print(f"{key}: {value}")
        if not env.is_main:
            return None
        path = Path(args.out) if args.out else default_out_path(cfg, device)
        write_report(path, env_info=environment(device), command=command, cfg=cfg, rows=rows, extra=extra,
                     notes=notes)
        print(f"report: {path} (+ {path.with_suffix('.json').name})")
        return path
    finally:
        teardown()
