"""Where the loop's metrics go: the console log, `<run>/metrics.jsonl`, the progress bar and TensorBoard.

`setup_logging(rank)` configures the root logger once (INFO on rank 0, WARNING elsewhere, rank and elapsed time in
the prefix). `MetricLogger` (rank 0) appends one JSON object per logged step to `<run>/metrics.jsonl`, shows a
progress display on a terminal (plain log lines otherwise) and, with `run.tensorboard=true`, writes the record's
numbers as TensorBoard scalars to `<run>/tensorboard`.

TensorBoard is an optional dependency (`pip install 'ibot-engine[tensorboard]'`). Without it the run goes on with
metrics.jsonl only, after one warning per process. Every numeric field of a record becomes a scalar at its step:
`knn_top1` / `knn_top5` under `eval/`, the training-health metrics (health.py) under `health/`, the rest under
`train/`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from ibot_engine.train.health import HEALTH_KEYS

log = logging.getLogger(__name__)
_START = time.time()
_warned_missing = False


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
    """Route the root logger to stdout with the rank and elapsed time in each line; replaces an earlier call's."""
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
    """`seconds` as H:MM:SS (negative counts as zero)."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def open_writer(run_dir: str | Path) -> Any | None:
    """A `SummaryWriter` on `<run_dir>/tensorboard`, or None (with a one-time warning) without tensorboard."""
    global _warned_missing
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            log.warning("run.tensorboard=true but the tensorboard package is not installed; metrics go to "
                        "metrics.jsonl only (pip install 'ibot-engine[tensorboard]' to get TensorBoard logs)")
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))


def write_record(writer: Any, record: dict[str, Any]) -> None:
    """Every finite number of `record` (but `step`) as a scalar at `record["step"]`."""
    step = int(record["step"])
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        group = "eval" if key.startswith("knn_") else "health" if key in HEALTH_KEYS else "train"
        writer.add_scalar(f"{group}/{key}", value, step)


class MetricLogger:
    """metrics.jsonl writer + terminal progress (+ TensorBoard scalars) (rank 0 only)."""

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
                     f"  I(t)/lnK {record['teacher_cls_info_frac']:.3f}"  # what the cls targets know of the image
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
