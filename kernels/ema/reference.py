"""EMA of a list of tensors, plain PyTorch: the spec, the CPU fallback and the test oracle.

    teacher_i <- momentum * teacher_i + (1 - momentum) * student_i      (fp32 arithmetic, in place)

One `torch._foreach_lerp_` per dtype group: a handful of launches, no per-tensor Python kernel loop.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor


def ema_update_(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    groups: dict[tuple[torch.dtype, torch.dtype, torch.device], tuple[list[Tensor], list[Tensor]]] = defaultdict(
        lambda: ([], [])
    )
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        groups[(t.dtype, s.dtype, t.device)][0].append(t)
        groups[(t.dtype, s.dtype, t.device)][1].append(s)
    weight = 1.0 - momentum
    for (t_dtype, s_dtype, _), (ts, ss) in groups.items():
        if t_dtype == torch.float32 and s_dtype == torch.float32:
            torch._foreach_lerp_(ts, ss, weight)
            continue
        # Low-precision storage: do the arithmetic in fp32, then round once on the way back.
        ts32 = [t.float() for t in ts]
        torch._foreach_lerp_(ts32, [s.float() for s in ss], weight)
        torch._foreach_copy_(ts, ts32)
