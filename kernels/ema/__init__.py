"""In-place EMA of the teacher's tensors towards the student's: `ema_update_(teacher, student, momentum)`.

See `reference.py` for the formula. Dispatch: `ibot_kernels.dispatch`. DTensors (FSDP2 parameters) are replaced by their
local shards first: teacher and student are sharded alike, so the update is local and needs no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ibot_kernels.dispatch import optional_module, use_triton
from ibot_kernels.ema.reference import ema_update_ as ema_update_reference_

_triton = optional_module("ibot_kernels.ema.triton")

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # builds without torch.distributed have no DTensor
    DTensor = None


def _local(tensors: list[Tensor]) -> list[Tensor]:
    if DTensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


@torch.no_grad()
def ema_update_(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, in place, fp32 arithmetic.

    Args:
        teacher: tensors updated in place (fp32, bf16 or fp16; plain tensors or DTensors).
        student: tensors of the same shapes, in the same order (a DTensor only where the teacher one is).
        momentum: weight of the old teacher value.

    Runs under `torch.no_grad()` whatever the caller's mode: the teacher is a target, and an in-place update of a
    leaf that requires grad would otherwise record autograd history into it (or fail).
    """
    teacher, student = _local(teacher), _local(student)
    if teacher and use_triton("ema_update_", _triton, *teacher, *student):
        _triton.ema_update_(teacher, student, momentum)
        return
    ema_update_reference_(teacher, student, momentum)
