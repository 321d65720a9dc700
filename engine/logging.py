"""Rank-aware logging and the metrics file.

`setup_logging(rank)` configures the root logger once (INFO on rank 0, WARNING elsewhere, rank and elapsed time in
the prefix). `MetricLogger` appends one JSON object per logged step to `<run>/metrics.jsonl` and shows a progress
display on a terminal (plain log lines otherwise).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ibot_engine.tensorboard import open_writer, write_record

_START = time.time()


class _Formatter(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        elapsed = record.created - _START
        return f"[ibot r{self.rank} {elapsed:7.1f}s] {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else ""
        )


def setup_logging(rank: int = 0) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_ibot", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter(rank))
    handler._ibot = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricLogger:
    """metrics.jsonl writer + terminal progress (rank 0 only)."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, start_step: int = 0,
                 tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._progress = None
        self._task = None
        self._tensorboard = None
        if enabled and tensorboard:
            self._tensorboard = open_writer(run_dir)
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]ibot"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.description}"), transient=True,
            )
            self._task = self._progress.add_task("", total=total_steps, completed=start_step)
            self._progress.start()

    def log(self, record: dict[str, Any], eta_s: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            write_record(self._tensorboard, record)
        line = f"step {record['step']}/{self.total_steps}"
        if "loss" in record:  # a training step (the step-0 record holds the random-init k-NN only)
            koleo = f" koleo {record['loss_koleo']:.4f}" if "loss_koleo" in record else ""
            line += (
                f"  loss {record['loss']:.4f} (cls {record['loss_cls']:.4f} patch {record['loss_patch']:.4f}{koleo})"
                f"  lr {record['lr']:.2e}  {record['img_per_s']:.1f} img/s  mem {record['max_memory_gib']:.2f} GiB"
                f"  eta {format_eta(eta_s)}"
            )
        if "teacher_cls_entropy_frac" in record:
            line += (f"  H(t)/lnK {record['teacher_cls_entropy_frac']:.3f}"
                     f"  std(t) {record['teacher_cls_std']:.3f}")
        if "knn_top1" in record:
            line += f"  k-NN top-1 {record['knn_top1']:.1f}% top-5 {record['knn_top5']:.1f}%"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], description=line.split("  lr")[0])
            self._progress.console.log(line)
        else:
            logging.getLogger("ibot_engine.train").info(line)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._progress is not None:
            self._progress.stop()
