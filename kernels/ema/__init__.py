"""In-place EMA of the teacher's tensors towards the student's: `ema_update_(teacher, student, momentum)`.

See `reference.py` for the formula. Dispatch: `kernels.dispatch`.
"""

from __future__ import annotations

from torch import Tensor

from kernels.dispatch import optional_module, use_triton
from kernels.ema.reference import ema_update_ as ema_update_reference_

_triton = optional_module("kernels.ema.triton")


def ema_update_(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, in place, fp32 arithmetic."""
    if teacher and use_triton("ema_update_", _triton, *teacher, *student):
        _triton.ema_update_(teacher, student, momentum)
        return
    ema_update_reference_(teacher, student, momentum)
