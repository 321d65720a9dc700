"""EMA update: the reference and the Triton kernel against the formula, over lists of 1 to 500 mixed tensors."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from kernel_helpers import BF16_INTERPRETER_RTOL, tol

import ibot_kernels
from ibot_kernels.dispatch import force_backend
from ibot_kernels.ema.reference import ema_update_ as ema_reference_

DTYPES = [torch.float32, torch.bfloat16]
MOMENTUM = 0.996


def _triton():
    from ibot_kernels.ema import triton as ema_triton  # imported late: needs TRITON_INTERPRET set before import

    return ema_triton


def _tensor_lists(num: int, device: str, mixed_dtypes: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`num` teacher/student pairs of mixed shapes (scalars, odd sizes, a few large) and dtype pairs."""
    sizes = [(65537,), (), (1,), (3,), (7, 5), (384,), (64, 3, 4, 4), (1000, 3), (0,), (5, 0)]
    teacher, student = [], []
    for i in range(num):
        # Each size once, then mostly small tensors (the interpreter pays per block) with some random sizes.
        shape = sizes[i % len(sizes)] if i < 100 else (int(torch.randint(1, 5000 if i % 10 == 0 else 400, ())),)
        if i >= len(sizes) and shape == (65537,):
            shape = (4097,)
        t_dtype = DTYPES[i % 2] if mixed_dtypes else torch.float32
        s_dtype = DTYPES[(i // 2) % 2] if mixed_dtypes else torch.float32
        teacher.append(torch.randn(shape, device=device).to(t_dtype))
        student.append(torch.randn(shape, device=device).to(s_dtype))
    return teacher, student


def _expected(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> list[torch.Tensor]:
    """The formula from the issue, in float64."""
    return [momentum * t.double() + (1 - momentum) * s.double() for t, s in zip(teacher, student)]


def _assert_formula(teacher: list[torch.Tensor], expected: list[torch.Tensor], bf16_rtol: float) -> None:
    """Compare all tensors of one dtype at once (one flat comparison instead of hundreds)."""
    for dtype in {t.dtype for t in teacher}:
        got = torch.cat([t.double().flatten() for t in teacher if t.dtype == dtype])
        want = torch.cat([e.flatten() for t, e in zip(teacher, expected) if t.dtype == dtype])
        if dtype == torch.float32:
            # fp32 lerp vs the float64 formula: a couple of ulps of values ~N(0, 1).
            torch.testing.assert_close(got, want, **tol(torch.float32))
        else:
            # Stored in bf16: one rounding of the fp32 result.
            torch.testing.assert_close(got, want, atol=1e-6, rtol=bf16_rtol)


# ---- reference ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num", [1, 7, 500])
def test_reference_matches_formula(num: int) -> None:
    teacher, student = _tensor_lists(num, "cpu")
    expected = _expected(teacher, student, MOMENTUM)
    ema_reference_(teacher, student, MOMENTUM)
    _assert_formula(teacher, expected, bf16_rtol=2.0**-8)


def test_reference_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="tensors"):
        ema_reference_([torch.zeros(3)], [], 0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_reference_([torch.zeros(3)], [torch.zeros(4)], 0.9)


def _check_dtensor_local_shards(backend: str) -> None:
    """DTensors (FSDP2 parameters) are updated through their local shards, with no communication."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1
        )
        try:
            mesh = init_device_mesh("cpu", (1,))
            full_t, full_s = torch.randn(10, 3), torch.randn(10, 3)
            teacher = [distribute_tensor(full_t.clone(), mesh, [Shard(0)]), torch.randn(4)]
            student = [distribute_tensor(full_s.clone(), mesh, [Shard(0)]), torch.randn(4)]
            expected = _expected([full_t, teacher[1]], [full_s, student[1]], 0.9)
            with force_backend(backend):
                ibot_kernels.ema_update_(teacher, student, 0.9)
            assert isinstance(teacher[0], DTensor)
            _assert_formula([teacher[0].full_tensor(), teacher[1]], expected, bf16_rtol=2.0**-8)
        finally:
            torch.distributed.destroy_process_group()


def test_public_op_on_dtensor_local_shards() -> None:
    _check_dtensor_local_shards("reference")


# ---- Triton kernel -----------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("num", [1, 2, 7, 500])
def test_triton_matches_formula(triton_device: str, num: int) -> None:
    teacher, student = _tensor_lists(num, triton_device)
    expected = _expected(teacher, student, MOMENTUM)
    _triton().ema_update_(teacher, student, MOMENTUM)
    bf16_rtol = BF16_INTERPRETER_RTOL if triton_device == "cpu" else 2.0**-8
    _assert_formula(teacher, expected, bf16_rtol)


@pytest.mark.interpreter
def test_triton_fp32_matches_reference_and_reuses_tables(triton_device: str) -> None:
    """fp32 pairs give the reference's `_foreach_lerp_` result; the second call hits the pointer-table cache."""
    ema_triton = _triton()
    teacher, student = _tensor_lists(20, triton_device, mixed_dtypes=False)
    teacher_ref = [t.clone() for t in teacher]
    for momentum in (0.9, 0.996):
        ema_triton.ema_update_(teacher, student, momentum)
        ema_reference_(teacher_ref, student, momentum)
        num_cached = len(ema_triton._cache)
        for t, r in zip(teacher, teacher_ref):
            torch.testing.assert_close(t, r, atol=1e-7, rtol=1e-7)  # fma contraction at most
    assert len(ema_triton._cache) == num_cached


@pytest.mark.interpreter
def test_triton_non_contiguous_and_empty(triton_device: str) -> None:
    ema_triton = _triton()
    base_t, base_s = torch.randn(6, 8, device=triton_device), torch.randn(6, 8, device=triton_device)
    teacher = [base_t.t(), torch.zeros(0, device=triton_device), torch.randn(5, device=triton_device)]
    student = [base_s.t(), torch.zeros(0, device=triton_device), torch.randn(5, device=triton_device)]
    expected = _expected(teacher, student, 0.5)
    ema_triton.ema_update_(teacher, student, 0.5)
    _assert_formula(teacher, expected, bf16_rtol=2.0**-8)
    ema_triton.ema_update_([], [], 0.5)  # no-op
    with pytest.raises(ValueError, match="shape"):
        ema_triton.ema_update_([torch.zeros(3, device=triton_device)], [torch.zeros(4, device=triton_device)], 0.9)


@pytest.mark.interpreter
def test_public_op_dispatches_to_triton(triton_device: str) -> None:
    teacher, student = _tensor_lists(7, triton_device)
    expected = _expected(teacher, student, MOMENTUM)
    with force_backend("triton"):
        ibot_kernels.ema_update_(teacher, student, MOMENTUM)
    _assert_formula(teacher, expected, BF16_INTERPRETER_RTOL)


@pytest.mark.interpreter
def test_public_op_on_dtensor_local_shards_triton(triton_device: str) -> None:
    if triton_device != "cpu":
        pytest.skip("the gloo mesh of this test holds CPU tensors")
    _check_dtensor_local_shards("triton")


def test_public_op_keeps_teacher_parameters_leaves_with_grad_enabled() -> None:
    """Called in grad mode on nn.Parameters (a user's own loop), the update records no autograd history."""
    teacher = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 3))]
    student = [torch.ones(5, requires_grad=True), torch.full((2, 3), 2.0, requires_grad=True)]
    with torch.enable_grad():
        ibot_kernels.ema_update_(teacher, student, 0.9)
    assert all(t.is_leaf and t.grad_fn is None for t in teacher)
    torch.testing.assert_close(teacher[0].detach(), torch.full((5,), 0.1))
    torch.testing.assert_close(teacher[1].detach(), torch.full((2, 3), 0.2))
