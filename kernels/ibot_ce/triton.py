"""Centered softmax cross-entropy in Triton: one streaming pass for the loss, one more for the gradient.

Per row m (shape legend: M rows, K prototypes; s = student / student_temp, t = (teacher - center) / teacher_temp):

    ce_m   = logsumexp(s_m) - sum_k p_mk * s_mk          with p_m = softmax(t_m)
    grad_m = (softmax(s_m) - p_m) / student_temp         d ce_m / d student_m

Forward kernel, one program per BLOCK_M rows:
  pass 1 streams over K once with online max/sum for both distributions (Milakov & Gimelshein, as Liger's cross
  entropy does) and accumulates `a = sum_k exp(t_k - max t) * (s_k - max s)`, which is a sum of terms <= 0. Then
  `ce = log(sum exp(s - max s)) - a / sum exp(t - max t)` is a sum of two non-negative numbers: no cancellation,
  even for logits of 1e4 at teacher_temp 0.01 (scaled values of 1e6).
  pass 2 (only when the student needs a gradient) streams over K again, backwards so that the most recently read
  blocks are still in L2, and writes `grad` in the student's dtype.
  With `compute_teacher_sum`, pass 1 also writes the column sum of the raw teacher tile of each program into a
  (num_programs, K) fp32 buffer, reduced by one `sum(0)`: deterministic, no atomics.

Backward multiplies the saved `grad` by the upstream per-row gradient in place (eager), so the only (M, K) tensor
beyond the inputs is that saved gradient, which becomes the returned gradient itself. Under tracing the multiply is
out of place and AOT autograd's donated buffers let Inductor reuse the saved one.
Traffic, fwd + bwd, with E bytes per element: read 2MK*E (pass 2 mostly re-reads L2), write MK*E (grad); backward
reads and writes MK*E once more: 5MK*E in all, against the 3MK*E of "read once, write once". No design avoids the
extra 2MK*E while the upstream gradient is an arbitrary per-row vector (recomputing the gradient in backward instead
also moves 5MK*E, and keeps student and teacher alive instead of one gradient buffer).

The temperatures reach the kernel as a (2,) fp32 device tensor: Dynamo guards on float arguments of custom ops (the
schema has no SymFloat), so floats would recompile the graph at every value of a scheduled teacher temperature.

Integration: `torch.library.custom_op` + `register_fake` + `register_autograd`, not `triton_op`. On torch 2.14.1
`triton_op`'s fake kernel traces the launch, and under TRITON_INTERPRET=1 `wrap_triton` passes the interpreted
kernel through, which then runs on meta tensors (`opcheck` fails with "Attempted to set the storage of a tensor on
device meta"). A custom op is opaque to Inductor (it cannot inline the kernel, which is already fused anyway) but
behaves the same under `torch.compile`, the interpreter and `opcheck`. `register_autograd` rather than an
`autograd.Function`, as the PyTorch recipe advises (fewer torch.compile composability pitfalls).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ibot_kernels.dispatch import interpreter_enabled

# A finite stand-in for -inf on masked lanes, so that `exp(masked - max)` is 0 and no inf - inf NaN appears.
# Real scaled logits must stay above it, which they do by 29 orders of magnitude.
_NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _ce_fwd_kernel(
    student_ptr,  # (M, K), fp32/bf16/fp16, any strides
    teacher_ptr,  # (M, K), fp32/bf16/fp16, any strides
    center_ptr,  # (K,) fp32
    ce_ptr,  # (M,) fp32, out
    grad_ptr,  # (M, K) contiguous, student dtype, out (unused unless COMPUTE_GRAD)
    teacher_sum_ptr,  # (num_programs, K) fp32 partial column sums, out (unused unless TEACHER_SUM)
    M,
    K,
    stride_s_row,
    stride_s_col,
    stride_t_row,
    stride_t_col,
    stride_c,
    temperatures_ptr,  # (2,) fp32: student_temp, teacher_temp (a tensor so that torch.compile does not specialize)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    TEACHER_SUM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K can exceed 2**31
    row_mask = rows < M
    student_rows = student_ptr + rows[:, None] * stride_s_row
    teacher_rows = teacher_ptr + rows[:, None] * stride_t_row
    col_offsets = tl.arange(0, BLOCK_K)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    student_temp = tl.load(temperatures_ptr)
    teacher_temp = tl.load(temperatures_ptr + 1)

    # Running statistics per row, all fp32: maxima, normalizers, and a = sum_k e^(t_k - max_t) (s_k - max_s) <= 0.
    max_s = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    max_t = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    sum_s = tl.zeros([BLOCK_M], tl.float32)
    sum_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)

    # Pass 1: read each (BLOCK_M, BLOCK_K) tile of student and teacher once, upcast to fp32 right after the load
    # (bf16 arithmetic is also wrong under the interpreter), update the online statistics.
    for kb in range(0, num_k_blocks):
        cols = kb * BLOCK_K + col_offsets
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(student_rows + cols[None, :] * stride_s_col, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(teacher_rows + cols[None, :] * stride_t_col, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(center_ptr + cols * stride_c, mask=col_mask, other=0.0).to(tl.float32)
        if TEACHER_SUM:
            # Raw (uncentred) teacher column sums of this program's rows; masked lanes loaded as 0.
            tl.store(teacher_sum_ptr + pid.to(tl.int64) * K + cols, tl.sum(y, axis=0), mask=col_mask)
        s = tl.where(mask, x / student_temp, _NEG_BIG)
        t = tl.where(mask, (y - c[None, :]) / teacher_temp, _NEG_BIG)
        new_max_s = tl.maximum(max_s, tl.max(s, axis=1))
        new_max_t = tl.maximum(max_t, tl.max(t, axis=1))
        scale_t = tl.exp(max_t - new_max_t)
        exp_t = tl.exp(t - new_max_t[:, None])  # 0 on masked lanes
        shifted_s = tl.where(mask, s - new_max_s[:, None], 0.0)  # <= 0
        # Re-base `acc` on the new student max (subtracting a non-negative amount keeps every term <= 0), then on
        # the new teacher max (a positive factor).
        acc = scale_t * (acc - sum_t * (new_max_s - max_s)) + tl.sum(exp_t * shifted_s, axis=1)
        sum_t = scale_t * sum_t + tl.sum(exp_t, axis=1)
        sum_s = tl.exp(max_s - new_max_s) * sum_s + tl.sum(tl.exp(s - new_max_s[:, None]), axis=1)
        max_s = new_max_s
        max_t = new_max_t

    # log(sum_s) >= 0 and -acc / sum_t >= 0: the loss is a sum of two non-negative terms.
    ce = tl.log(sum_s) - acc / sum_t
    tl.store(ce_ptr + rows, ce, mask=row_mask)

    if COMPUTE_GRAD:
        inv_sum_s = 1.0 / sum_s
        inv_sum_t = 1.0 / sum_t
        grad_rows = grad_ptr + rows[:, None] * K
        # Pass 2, last block first: the tail of pass 1 is the part most likely to still be in L2.
        for i in range(0, num_k_blocks):
            cols = (num_k_blocks - 1 - i) * BLOCK_K + col_offsets
            col_mask = cols < K
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(student_rows + cols[None, :] * stride_s_col, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(teacher_rows + cols[None, :] * stride_t_col, mask=mask, other=0.0).to(tl.float32)
            c = tl.load(center_ptr + cols * stride_c, mask=col_mask, other=0.0).to(tl.float32)
            s = tl.where(mask, x / student_temp, _NEG_BIG)
            t = tl.where(mask, (y - c[None, :]) / teacher_temp, _NEG_BIG)
            p_s = tl.exp(s - max_s[:, None]) * inv_sum_s[:, None]
            p_t = tl.exp(t - max_t[:, None]) * inv_sum_t[:, None]
            grad = (p_s - p_t) / student_temp
            tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _ce_config(M: int, K: int, device: torch.device, teacher_sum: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps): about 4 programs per SM, tiles of `tile` elements.

    Several rows per program only when M is large (and at least 8 with the teacher sum, which bounds its partial
    buffer at MK/8 fp32). The interpreter runs programs one after another at ~6 ms per tile whatever its size, so
    there the tiles are large and the programs few.
    """
    if interpreter_enabled():
        target_programs, tile, num_warps = 4, 1 << 16, 4
    else:
        target_programs = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        tile, num_warps = 4096, 8
    block_m = min(16, _prev_pow2(M // target_programs))
    if teacher_sum:
        block_m = max(block_m, min(8, _next_pow2(M)))
    block_k = max(16, min(_next_pow2(K), tile // block_m))
    # Narrow K (e.g. K = 3): fill the tile with rows instead.
    block_m = max(block_m, min(tile // block_k, _next_pow2(triton.cdiv(M, target_programs)), 1024))
    return block_m, block_k, num_warps


def ce_fwd(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    temperatures: Tensor,
    compute_grad: bool,
    compute_teacher_sum: bool,
    block_m: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel. `temperatures` = (student_temp, teacher_temp), fp32 on the inputs' device.

    Returns (ce (M,) fp32, grad (M, K) or empty, teacher_sum (K,) fp32 or empty).

    `block_m` / `block_k` override the heuristic (tests use them to cover multi-row, multi-block tiles).
    """
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must both be (M, K); got {tuple(student.shape)}, {tuple(teacher.shape)}")
    M, K = student.shape
    if K == 0:
        raise ValueError("centered_softmax_cross_entropy needs K >= 1 prototypes")
    if center.shape != (K,):
        raise ValueError(f"center must be ({K},); got {tuple(center.shape)}")
    center = center.float()
    ce = torch.empty(M, device=student.device, dtype=torch.float32)
    grad = student.new_empty((M, K) if compute_grad else (0,))
    if M == 0:
        teacher_sum = torch.zeros(K if compute_teacher_sum else 0, device=student.device, dtype=torch.float32)
        return ce, grad, teacher_sum
    heur_m, heur_k, num_warps = _ce_config(M, K, student.device, compute_teacher_sum)
    BLOCK_M = block_m or heur_m
    BLOCK_K = block_k or heur_k
    num_programs = triton.cdiv(M, BLOCK_M)
    partial_sum = torch.empty(
        (num_programs, K) if compute_teacher_sum else (0,), device=student.device, dtype=torch.float32
    )
    _ce_fwd_kernel[(num_programs,)](
        student, teacher, center, ce, grad, partial_sum, M, K,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), center.stride(0), temperatures,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, COMPUTE_GRAD=compute_grad, TEACHER_SUM=compute_teacher_sum,
        num_warps=num_warps,
    )  # fmt: skip
    teacher_sum = partial_sum.sum(0) if compute_teacher_sum else partial_sum
    return ce, grad, teacher_sum


# ---- torch.library registration ------------------------------------------------------------------------------


# The temperatures travel as a (2,) fp32 device tensor, not as floats: Dynamo guards on every float argument of a
# custom op (the schema has no SymFloat), so a scheduled teacher temperature would recompile the graph each step.
@torch.library.custom_op("ibot::centered_softmax_ce_fwd", mutates_args=())
def centered_softmax_ce_fwd(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    temperatures: Tensor,
    compute_grad: bool,
    compute_teacher_sum: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return ce_fwd(student, teacher, center, temperatures, compute_grad, compute_teacher_sum)


@centered_softmax_ce_fwd.register_fake
def _(student, teacher, center, temperatures, compute_grad, compute_teacher_sum):
    M, K = student.shape
    ce = student.new_empty(M, dtype=torch.float32)
    grad = student.new_empty((M, K) if compute_grad else (0,))
    teacher_sum = student.new_empty(K if compute_teacher_sum else 0, dtype=torch.float32)
    return ce, grad, teacher_sum


def _setup_context(ctx, inputs, output) -> None:
    _, grad, teacher_sum = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad, teacher_sum)


def _backward(ctx, grad_ce: Tensor, _grad_grad: Tensor, _grad_teacher_sum: Tensor):
    (grad,) = ctx.saved_tensors
    if grad.dim() != 2:
        raise RuntimeError("ibot::centered_softmax_ce_fwd ran with compute_grad=False; it has no student gradient")
    scale = grad_ce.unsqueeze(1)
    if type(grad) is torch.Tensor:
        # Eager: scale the saved buffer in place, so no second (M, K) tensor exists. Autograd's version counter
        # turns a second backward through the same graph (retain_graph=True) into an error instead of a silently
        # rescaled gradient.
        return grad.mul_(scale), None, None, None, None, None
    # Traced (torch.compile, opcheck): functional tensors. AOT autograd's partitioner rejects an in-place op on a
    # saved output ("Node mul was invalid, but is output"); out of place, its donated-buffer pass lets Inductor
    # reuse the saved buffer instead.
    return grad * scale, None, None, None, None, None


centered_softmax_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


def temperature_tensor(student_temp: float | Tensor, teacher_temp: float | Tensor, device: torch.device) -> Tensor:
    """(student_temp, teacher_temp) as a (2,) fp32 tensor on `device`, filled on the device (no host copy)."""
    if torch.compiler.is_compiling():
        # Tensor arithmetic makes Dynamo turn float inputs into graph inputs; item assignment or torch.full would
        # guard on each value instead. Inductor fuses this into one tiny kernel.
        one = torch.ones(1, device=device, dtype=torch.float32)
        return torch.cat([one * student_temp, one * teacher_temp])
    # fill_ on each element: a Python float travels as a kernel argument. (Item assignment, `t[0] = x`, would first
    # wrap x in a CPU tensor and copy it to the device: a host-to-device copy per call.)
    temperatures = torch.empty(2, device=device, dtype=torch.float32)
    temperatures[0].fill_(student_temp)
    temperatures[1].fill_(teacher_temp)
    return temperatures


def centered_softmax_cross_entropy(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    student_temp: float | Tensor,
    teacher_temp: float | Tensor,
    return_teacher_sum: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton version of `ibot_kernels.ibot_ce.reference.centered_softmax_cross_entropy` (same signature and result)."""
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    temperatures = temperature_tensor(student_temp, teacher_temp, student.device)
    ce, _, teacher_sum = torch.ops.ibot.centered_softmax_ce_fwd(
        student, teacher.detach(), center.detach(), temperatures, compute_grad, return_teacher_sum
    )
    return (ce, teacher_sum) if return_teacher_sum else ce
