"""The step harness of `ibot bench` and `ibot profile`: the real trainer and its step, timed by timing.py.

What runs is `ibot_engine.train.trainer.build_trainer` + `ibot_engine.train.step.train_step`, the loop's own step, on:
* synthetic batches (default): a few `Batch`es made once on the device before timing (random crops at the
  configured sizes, masks from `ibot_engine.data.masking.generate_masks`, made outside the step as a loader would),
  cycled; the trainer is built on a tiny lazily rendered built-in dataset that is never read;
* the configured data stream with `--data` (`data.path` / `data.shards`): the host time spent in
  `next(data_iter)` + `.to(device)` is measured on its own and reported as the data-wait share of the wall time.

`--find-max-batch`: the largest per-process batch whose full step runs without `torch.OutOfMemoryError`, by
doubling from `train.batch_size` then bisection (`find_max_batch`, pure search over a "try batch b" callable);
`--max-batch` caps it (needed on CPU, where nothing runs out of memory).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ibot_engine.bench.timing import (
    BenchRow,
    count_flops,
    free_device_memory,
    make_row,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
    time_steps,
)
from ibot_engine.config import Config
from ibot_engine.data.batch import Batch
from ibot_engine.data.masking import generate_masks, masked_token_indices
from ibot_engine.distributed import DistEnv
from ibot_engine.precision import autocast_dtype
from ibot_engine.train.parallel import build_grad_scaler
from ibot_engine.train.schedules import Hyperparams, hyperparams_at
from ibot_engine.train.step import train_step
from ibot_engine.train.trainer import Trainer, build_trainer

log = logging.getLogger(__name__)

# A mid-run step: past the lr / teacher-temperature warm-ups and the frozen last layer (whatever the config's
# epochs), so the optimizer updates every parameter as in most of a run.
_NOMINAL_STEPS_PER_EPOCH = 1000
_NOMINAL_TOTAL_STEPS = 200 * _NOMINAL_STEPS_PER_EPOCH
_BENCH_STEP = _NOMINAL_TOTAL_STEPS // 2


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
        mask_indices, _ = masked_token_indices(masks)
        batches.append(Batch(
            global_crops=torch.randn(G * batch_size, 3, d.global_size, d.global_size, device=device, generator=gen),
            local_crops=torch.randn(L * batch_size, 3, d.local_size, d.local_size, device=device, generator=gen),
            masks=masks.to(device), mask_indices=mask_indices.to(device),
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
    """Build the trainer of `cfg` (ibot_engine.train.trainer.build_trainer) and its batches."""
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


def bench_harness(h: StepHarness, *, steps: int, warmup: int, peak: float | None) -> BenchRow:
    """FLOPs of one real step, then warm-up and timed steps of `h`."""
    device = h.env.device
    flops = count_flops(lambda: h.run(0))
    reset_peak_memory(device)
    times = time_steps(h.run, steps=steps, warmup=warmup, device=device)
    return make_row("ibot-engine", h.batch_size, times, flops, peak, peak_memory_gib(device))


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
            if h.trainer.scaler.is_enabled():
                # fp16: a step cut short by OOM leaves the scaler mid-step ("already unscaled"). GradScaler has no
                # public reset of that per-optimizer state: a fresh scaler with the same scale replaces it.
                fresh = build_grad_scaler(h.cfg, h.env)
                fresh.load_state_dict(h.trainer.scaler.state_dict())
                h.trainer.scaler = fresh
            free_device_memory(h.env.device)

    return try_batch
