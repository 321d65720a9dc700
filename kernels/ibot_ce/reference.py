"""Centered softmax cross-entropy, plain PyTorch: the spec, the CPU fallback and the test oracle.

    ce_m = -sum_k softmax((teacher_m - center) / teacher_temp)_k * log_softmax(student_m / student_temp)_k

Shapes: student, teacher (M, K) in fp32/bf16/fp16; center (K,) fp32; returns ce (M,) fp32 (float64 for float64
inputs, so that `gradcheck` can run on it). The teacher side is a target: no gradient flows to `teacher` or `center`.
Memory traffic (eager): reads 2MK, writes ~4MK fp32 temporaries (probabilities, log-probabilities, product).
"""

from __future__ import annotations

import torch
from torch import Tensor


def centered_softmax_cross_entropy(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    return_teacher_sum: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    # fp32 arithmetic for fp32/bf16/fp16 inputs; float64 stays float64.
    opmath = torch.promote_types(student.dtype, torch.float32)
    teacher_f = teacher.detach().to(torch.promote_types(teacher.dtype, torch.float32))
    p_teacher = torch.softmax((teacher_f - center.detach()) / teacher_temp, dim=-1).to(opmath)
    log_p_student = torch.log_softmax(student.to(opmath) / student_temp, dim=-1)
    ce = -(p_teacher * log_p_student).sum(dim=-1)
    if return_teacher_sum:
        return ce, teacher_f.sum(dim=0)
    return ce
