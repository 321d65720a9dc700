"""Optional TensorBoard scalars next to metrics.jsonl (`run.tensorboard=true`).

The `tensorboard` package is an optional dependency (`pip install 'ibot-engine[tensorboard]'`). Without it the run
goes on with metrics.jsonl only, after one warning per process. Events go to `<run.dir>/tensorboard`; every numeric
field of a metrics record becomes a scalar at its step (`knn_top1` / `knn_top5` under `eval/`, the training-health
metrics of `ibot_engine.health` under `health/`, the rest under `train/`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ibot_engine.health import HEALTH_KEYS

log = logging.getLogger(__name__)
_warned_missing = False


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
