"""The autocast dtype of `precision` (the config key) on a device; training, evaluation and benchmarks share it."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 / fp16 for those precisions, None (no autocast) for fp32; `auto` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
