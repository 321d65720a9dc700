"""`ibot bench`: images/s, step time, MFU and peak memory of the real training step, optionally beside lightly's.

    ibot bench --config launch/configs/vit_s16.yaml train.batch_size=64 --steps 30 --warmup 5 --compare lightly

The step runs in the harness (harness.py), timed and counted by timing.py, written up by report.py; the lightly
row is lightly_peer.py's timing of lightly's example (lightly_example.py).

Under torchrun (`distributed.strategy=ddp|fsdp`) every rank runs the harness and reports its own img/s; rank 0
writes the report. `--find-max-batch` is single-process only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ibot_engine.bench.harness import bench_harness, build_harness, find_max_batch, harness_batch_trier
from ibot_engine.bench.lightly_example import require_lightly
from ibot_engine.bench.lightly_peer import LightlyStep
from ibot_engine.bench.report import command_line, default_out_path, environment, results_table, write_report
from ibot_engine.bench.timing import (
    BenchSetupError,
    free_device_memory,
    measured_gemm_tflops,
    peak_flops,
    peak_source,
    precision_name,
)
from ibot_engine.config import Config
from ibot_engine.distributed import init_distributed, teardown
from ibot_engine.precision import autocast_dtype


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
        require_lightly()  # before any expensive work
    env = init_distributed()
    try:
        device = env.device
        command = command_line("ibot", args.argv)
        h = build_harness(cfg, env, real_data=args.data, num_batches=args.num_batches)
        precision = precision_name(h.amp_dtype, device)
        peak = peak_flops(device, precision, args.peak_tflops)
        rows = [bench_harness(h, steps=args.steps, warmup=args.warmup, peak=peak)]
        gemm_dtype = h.amp_dtype if h.amp_dtype is not None else torch.float32
        gemm = measured_gemm_tflops(device, gemm_dtype)
        extra: dict[str, Any] = {"precision": precision, "peak_flops_used": peak,
                                 "peak_source": peak_source(device, args.peak_tflops),
                                 f"measured_gemm_tflops ({str(gemm_dtype).removeprefix('torch.')} 8192^3)":
                                     None if gemm is None else round(gemm, 1),
                                 "data": "configured data stream (--data)" if args.data else "synthetic, on device"}
        notes = []
        if args.find_max_batch:
            extra["largest_batch_ibot_engine"] = find_max_batch(harness_batch_trier(h), cfg.train.batch_size,
                                                                args.max_batch)
        del h
        free_device_memory(device)
        if args.compare == "lightly":
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
        write_report(path, env_info=environment(device, command), cfg=cfg, rows=rows, extra=extra, notes=notes)
        print(f"report: {path} (+ {path.with_suffix('.json').name})")
        return path
    finally:
        teardown()
