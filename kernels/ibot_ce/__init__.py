"""Centered softmax cross-entropy over K prototypes (the iBOT / DINO distillation term).

Public op: `centered_softmax_cross_entropy(student, teacher, center, student_temp, teacher_temp,
return_teacher_sum=False)`, see `reference.py` for the formula and shapes. Dispatch: `ibot_kernels.dispatch`.
"""

from __future__ import annotations

from torch import Tensor

from ibot_kernels.dispatch import optional_module, use_triton
from ibot_kernels.ibot_ce.reference import centered_softmax_cross_entropy as centered_softmax_cross_entropy_reference

_triton = optional_module("ibot_kernels.ibot_ce.triton")


def centered_softmax_cross_entropy(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    return_teacher_sum: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-row cross-entropy between the centred teacher softmax and the student log-softmax (fp32, shape (M,))."""
    if use_triton("centered_softmax_cross_entropy", _triton, student, teacher, center):
        return _triton.centered_softmax_cross_entropy(
            student, teacher, center, student_temp, teacher_temp, return_teacher_sum
        )
    return centered_softmax_cross_entropy_reference(
        student, teacher, center, student_temp, teacher_temp, return_teacher_sum
    )
