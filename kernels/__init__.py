"""Fused kernels for iBOT training. Public ops only; `kernels` never imports `engine`.

Each op lives in its own folder with `reference.py` (plain PyTorch: spec, fallback, oracle) and `triton.py`.
`ibot_kernels.dispatch` picks the backend per call (env `IBOT_KERNELS=auto|triton|reference`).
"""

from ibot_kernels.dispatch import current_backend, force_backend
from ibot_kernels.ema import ema_update_
from ibot_kernels.ibot_ce import centered_softmax_cross_entropy

__all__ = ["centered_softmax_cross_entropy", "current_backend", "ema_update_", "force_backend"]
