"""EMA of many tensors in one Triton launch per (teacher dtype, student dtype) pair, through pointer tables.

    teacher_i <- teacher_i + (1 - momentum) * (student_i - teacher_i)      (fp32 arithmetic, in place)

which is `momentum * teacher + (1 - momentum) * student` written as the lerp `torch._foreach_lerp_` computes, so
fp32 results match the reference bit for bit up to FMA contraction.

Design: the tensors stay where they are (no flat copy, no copy back). For each dtype pair the host builds, once,
device tables of the tensors' addresses and sizes and a block table (tensor index, first element) with one entry
per BLOCK elements; program `pid` handles block `pid`. The tables are cached, keyed by the tensors' addresses and
sizes, so a training step does no host work beyond building that key and one launch per dtype pair (one in
practice: fp32 teacher, fp32 student). Full blocks load and store without a mask so that they vectorize; only the
last block of each tensor is masked. Addresses loaded from a table carry no alignment information, so the host
checks 16-byte alignment and passes it as a hint.

Traffic: read 2N, write N elements (teacher read + written, student read), the same floor as one flat `lerp_`.

FSDP2: `ibot_kernels.ema.ema_update_` passes `DTensor.to_local()` shards here. Teacher and student are sharded the same
way, so the EMA is elementwise on the local shards and needs no communication (what DINOv2 does with FSDP1 flat
shards). Uneven sharding gives some ranks empty shards, which get no blocks.

The interpreter dereferences table addresses in host memory, so the same code runs on CPU tensors with
TRITON_INTERPRET=1.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ibot_kernels.ema.reference import ema_update_ as ema_update_reference_

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_CACHE_SIZE = 8  # distinct parameter lists seen in one process (teacher/student pairs, benchmark shapes)


@triton.jit
def _ema_kernel(
    teacher_addr_ptr,  # (N,) int64: data_ptr of each teacher tensor
    student_addr_ptr,  # (N,) int64: data_ptr of each student tensor
    numel_ptr,  # (N,) int64: elements in each tensor
    block_tensor_ptr,  # (num_blocks,) int32: tensor index of each block
    block_start_ptr,  # (num_blocks,) int64: first element of each block inside its tensor
    weight,  # 1 - momentum, fp32
    T_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,  # byte alignment of every address in the tables (16 or 1)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    index = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    numel = tl.load(numel_ptr + index)
    teacher_ptr = tl.multiple_of(tl.load(teacher_addr_ptr + index), ALIGN).to(tl.pointer_type(T_DTYPE))
    student_ptr = tl.multiple_of(tl.load(student_addr_ptr + index), ALIGN).to(tl.pointer_type(S_DTYPE))
    offsets = start + tl.arange(0, BLOCK)
    # Load in storage precision, compute in fp32, round once on the store.
    if start + BLOCK <= numel:
        t = tl.load(teacher_ptr + offsets).to(tl.float32)
        s = tl.load(student_ptr + offsets).to(tl.float32)
        tl.store(teacher_ptr + offsets, (t + weight * (s - t)).to(T_DTYPE))
    else:
        mask = offsets < numel
        t = tl.load(teacher_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(student_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(teacher_ptr + offsets, (t + weight * (s - t)).to(T_DTYPE), mask=mask)


@dataclass(frozen=True, slots=True)
class _Group:
    """Device tables for the tensors of one (teacher dtype, student dtype) pair."""

    t_dtype: torch.dtype
    s_dtype: torch.dtype
    align: int
    teacher_addr: Tensor
    student_addr: Tensor
    numel: Tensor
    block_tensor: Tensor
    block_start: Tensor


_cache: OrderedDict[tuple, list[_Group]] = OrderedDict()


def _block_size() -> int:
    # 4096 elements (16 KiB of fp32) per program on the GPU. Kept under the interpreter too: most parameters are
    # small, and a large masked block costs the interpreter more than several small ones.
    return 4096


def _build_group(pairs: list[tuple[Tensor, Tensor]], device: torch.device, block: int) -> _Group:
    numels = [t.numel() for t, _ in pairs]
    teacher_addrs = [t.data_ptr() for t, _ in pairs]
    student_addrs = [s.data_ptr() for _, s in pairs]
    align = 16 if all(a % 16 == 0 for a in teacher_addrs + student_addrs) else 1
    numel = torch.tensor(numels, dtype=torch.int64)
    num_blocks = (numel + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(pairs), dtype=torch.int32), num_blocks)
    first_block = torch.cumsum(num_blocks, 0) - num_blocks
    block_start = (torch.arange(int(num_blocks.sum()), dtype=torch.int64) - first_block[block_tensor.long()]) * block
    return _Group(
        t_dtype=pairs[0][0].dtype,
        s_dtype=pairs[0][1].dtype,
        align=align,
        teacher_addr=torch.tensor(teacher_addrs, dtype=torch.int64, device=device),
        student_addr=torch.tensor(student_addrs, dtype=torch.int64, device=device),
        numel=numel.to(device),
        block_tensor=block_tensor.to(device),
        block_start=block_start.to(device),
    )


def _groups(teacher: list[Tensor], student: list[Tensor], block: int) -> tuple[list[_Group], list[int]]:
    """Cached tables for the tensors the kernel can take, and the indices of those it cannot (reference path)."""
    key_parts: list[object] = [block]
    fallback = []
    for i, (t, s) in enumerate(zip(teacher, student)):
        key_parts.append((t.data_ptr(), s.data_ptr(), t.numel(), t.dtype, s.dtype))
        if not (t.is_contiguous() and s.is_contiguous()) or t.dtype not in _TL_DTYPES or s.dtype not in _TL_DTYPES:
            fallback.append(i)
    key = tuple(key_parts)
    groups = _cache.get(key)
    if groups is not None:
        _cache.move_to_end(key)
        return groups, fallback
    skip = set(fallback)
    by_dtype: dict[tuple[torch.dtype, torch.dtype], list[tuple[Tensor, Tensor]]] = {}
    for i, (t, s) in enumerate(zip(teacher, student)):
        if i not in skip and t.numel() > 0:
            by_dtype.setdefault((t.dtype, s.dtype), []).append((t, s))
    device = teacher[0].device
    groups = [_build_group(pairs, device, block) for pairs in by_dtype.values()]
    _cache[key] = groups
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return groups, fallback


def ema_update_(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    """In-place `teacher_i = momentum * teacher_i + (1 - momentum) * student_i` for plain (local) tensors."""
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    for t, s in zip(teacher, student):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if t.device != s.device:
            raise ValueError(f"ema_update_: teacher on {t.device} but student on {s.device}")
    if not teacher:
        return
    block = _block_size()
    groups, fallback = _groups(teacher, student, block)
    weight = 1.0 - float(momentum)
    for g in groups:
        num_blocks = g.block_tensor.numel()
        _ema_kernel[(num_blocks,)](
            g.teacher_addr, g.student_addr, g.numel, g.block_tensor, g.block_start, weight,
            T_DTYPE=_TL_DTYPES[g.t_dtype], S_DTYPE=_TL_DTYPES[g.s_dtype], ALIGN=g.align, BLOCK=block,
            num_warps=8,
        )  # fmt: skip
    if fallback:
        # Non-contiguous views or other dtypes: rare (parameters and FSDP2 shards are contiguous).
        ema_update_reference_([teacher[i] for i in fallback], [student[i] for i in fallback], momentum)
