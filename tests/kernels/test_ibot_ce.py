"""Centered softmax cross-entropy: the reference (gradcheck, properties) and the Triton kernel against it.

Interpreter-marked tests call the Triton entry directly and take `triton_device`, so they skip (never pass) unless
the kernel really runs: on CUDA, or on CPU under TRITON_INTERPRET=1 (`test_interpreter_suite.py` runs them so).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import BF16_INTERPRETER_RTOL, assert_within_2x_reference, tol
from torch._dynamo.testing import CompileCounterWithBackend

from ibot_kernels.ibot_ce.reference import centered_softmax_cross_entropy as ce_reference

SHAPES_M = [0, 1, 7, 300]
SHAPES_K = [1, 3, 1000, 8192, 65537]
TEMPERATURES = [(0.1, 0.04), (1.0, 1.0), (0.1, 0.01), (0.01, 0.07)]


def _triton():
    from ibot_kernels.ibot_ce import triton as ce_triton  # imported late: needs TRITON_INTERPRET set before import

    return ce_triton


def _inputs(M: int, K: int, device: str, scale: float = 3.0, dtype: torch.dtype = torch.float32):
    student = (torch.randn(M, K, device=device) * scale).to(dtype)
    teacher = (torch.randn(M, K, device=device) * scale).to(dtype)
    center = torch.randn(K, device=device) * 0.5
    return student, teacher, center


def _run(fn, student, teacher, center, student_temp, teacher_temp, grad_weights=None):
    """ce, teacher_sum and d(sum_m w_m ce_m)/d student through `fn` (Triton entry or reference)."""
    student = student.detach().clone().requires_grad_()
    ce, teacher_sum = fn(student, teacher, center, student_temp, teacher_temp, return_teacher_sum=True)
    if grad_weights is None:
        grad_weights = torch.linspace(0.5, 2.0, ce.shape[0], device=ce.device)  # not all ones: exercises the scale
    (ce * grad_weights).sum().backward()
    return ce.detach(), teacher_sum, student.grad


def _assert_matches_reference(student, teacher, center, student_temp, teacher_temp, scale_ce: float = 1.0):
    ce, tsum, grad = _run(
        _triton().centered_softmax_cross_entropy, student, teacher, center, student_temp, teacher_temp
    )
    ce_ref, tsum_ref, grad_ref = _run(ce_reference, student, teacher, center, student_temp, teacher_temp)
    assert ce.dtype == torch.float32 and tsum.dtype == torch.float32
    torch.testing.assert_close(ce, ce_ref, **tol(torch.float32))
    # Gradients are (p_s - p_t) / student_temp: compare on the scale of 1 / student_temp.
    atol, rtol = tol(torch.float32).values()
    torch.testing.assert_close(grad, grad_ref, atol=atol / student_temp, rtol=rtol)
    # Column sums of M values: fp32 summation-order error grows with M and the magnitude of the logits.
    torch.testing.assert_close(tsum, tsum_ref, atol=atol * max(1, student.shape[0]) * scale_ce, rtol=rtol)


# ---- reference ---------------------------------------------------------------------------------------------------


def test_reference_gradcheck_float64() -> None:
    student = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 11, dtype=torch.float64)
    center = torch.randn(11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: ce_reference(s, teacher, center, 0.1, 0.04), (student,))


def test_reference_matches_formula_and_gives_teacher_no_gradient() -> None:
    student = torch.randn(5, 13, requires_grad=True)
    teacher = torch.randn(5, 13, requires_grad=True)
    center = torch.randn(13)
    ce, tsum = ce_reference(student, teacher, center, 0.1, 0.04, return_teacher_sum=True)
    p = torch.softmax((teacher.detach().double() - center.double()) / 0.04, -1)
    expected = -(p * torch.log_softmax(student.detach().double() / 0.1, -1)).sum(-1)
    torch.testing.assert_close(ce.double(), expected, **tol(torch.float32))
    torch.testing.assert_close(tsum, teacher.detach().sum(0))
    ce.sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_reference_identical_rows_give_log_k() -> None:
    student = torch.full((3, 1000), 7.0)
    ce = ce_reference(student, torch.full((3, 1000), -2.0), torch.zeros(1000), 0.1, 0.01)
    torch.testing.assert_close(ce, torch.full((3,), math.log(1000.0)))


# ---- Triton kernel vs reference -------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("K", SHAPES_K)
@pytest.mark.parametrize("M", SHAPES_M)
def test_triton_matches_reference_shapes(triton_device: str, M: int, K: int) -> None:
    _assert_matches_reference(*_inputs(M, K, triton_device), 0.1, 0.04)


@pytest.mark.interpreter
@pytest.mark.parametrize(("student_temp", "teacher_temp"), TEMPERATURES)
def test_triton_matches_reference_temperatures(triton_device: str, student_temp: float, teacher_temp: float) -> None:
    _assert_matches_reference(*_inputs(7, 1000, triton_device), student_temp, teacher_temp)


@pytest.mark.interpreter
@pytest.mark.parametrize("teacher_temp", [0.01, 0.04])
def test_triton_extreme_logits(triton_device: str, teacher_temp: float) -> None:
    """Logits up to +-1e4 at teacher_temp 0.01: scaled values of 1e6, stable through the max subtraction."""
    student = (torch.rand(7, 1000, device=triton_device) * 2 - 1) * 1e4
    teacher = (torch.rand(7, 1000, device=triton_device) * 2 - 1) * 1e4
    student[0] = 1e4  # a row of identical extreme values
    teacher[1] = -1e4
    center = torch.zeros(1000, device=triton_device)
    _assert_matches_reference(student, teacher, center, 0.1, teacher_temp, scale_ce=1e4)


@pytest.mark.interpreter
def test_triton_identical_rows(triton_device: str) -> None:
    student = torch.full((4, 1000), 3.0, device=triton_device, requires_grad=True)
    teacher = torch.full((4, 1000), -1.0, device=triton_device)
    ce = _triton().centered_softmax_cross_entropy(student, teacher, torch.zeros(1000, device=triton_device), 0.1, 0.01)
    ce.sum().backward()
    torch.testing.assert_close(ce, torch.full((4,), math.log(1000.0), device=triton_device))
    torch.testing.assert_close(student.grad, torch.zeros_like(student), atol=1e-6, rtol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize(("M", "K", "block_m", "block_k"), [(9, 1000, 4, 128), (5, 300, 8, 64), (3, 17, 2, 16)])
def test_triton_multi_row_tiles(triton_device: str, M: int, K: int, block_m: int, block_k: int) -> None:
    """Tiles of several rows and several K blocks with masked row and column tails (the GPU configurations)."""
    student, teacher, center = _inputs(M, K, triton_device)
    temperatures = _triton().temperature_tensor(0.1, 0.04, student.device)
    ce, grad, tsum = _triton().ce_fwd(student, teacher, center, temperatures, True, True, block_m, block_k)
    ce_ref, tsum_ref, grad_ref = _run(
        ce_reference, student, teacher, center, 0.1, 0.04, torch.ones(M, device=triton_device)
    )
    torch.testing.assert_close(ce, ce_ref, **tol(torch.float32))
    torch.testing.assert_close(grad, grad_ref, atol=1e-4, rtol=1e-5)  # 1e-5 / student_temp, see above
    torch.testing.assert_close(tsum, tsum_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.interpreter
def test_triton_non_contiguous_inputs(triton_device: str) -> None:
    student = torch.randn(1000, 7, device=triton_device).t()  # column-major
    teacher = torch.randn(7, 2000, device=triton_device)[:, ::2]  # strided columns
    center = torch.randn(2000, device=triton_device)[::2]
    assert not (student.is_contiguous() or teacher.is_contiguous() or center.is_contiguous())
    _assert_matches_reference(student, teacher, center, 0.1, 0.04)


@pytest.mark.interpreter
def test_triton_bf16_inputs(triton_device: str) -> None:
    """bf16 storage, fp32 math: ce matches the reference on the same bf16 values; grad within one bf16 ulp."""
    student, teacher, center = _inputs(7, 1000, triton_device, dtype=torch.bfloat16)
    ce, tsum, grad = _run(_triton().centered_softmax_cross_entropy, student, teacher, center, 0.1, 0.04)
    ce_ref, tsum_ref, grad_ref = _run(ce_reference, student, teacher, center, 0.1, 0.04)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(ce, ce_ref, **tol(torch.float32))
    torch.testing.assert_close(tsum, tsum_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-4, rtol=2 * BF16_INTERPRETER_RTOL)


@pytest.mark.interpreter
def test_triton_without_grad_or_teacher_sum(triton_device: str) -> None:
    student, teacher, center = _inputs(7, 1000, triton_device)
    with torch.no_grad():
        ce = _triton().centered_softmax_cross_entropy(student.requires_grad_(), teacher, center, 0.1, 0.04)
    assert not ce.requires_grad
    torch.testing.assert_close(ce, ce_reference(student.detach(), teacher, center, 0.1, 0.04), **tol(torch.float32))


@pytest.mark.interpreter
def test_triton_second_backward_is_an_error(triton_device: str) -> None:
    """The saved gradient is scaled in place, so backward through the same graph twice must fail loudly."""
    student, teacher, center = _inputs(3, 100, triton_device)
    student.requires_grad_()
    ce = _triton().centered_softmax_cross_entropy(student, teacher, center, 0.1, 0.04)
    ce.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        ce.sum().backward()


@pytest.mark.interpreter
def test_triton_bad_shapes_raise(triton_device: str) -> None:
    student, teacher, center = _inputs(3, 10, triton_device)
    with pytest.raises(ValueError, match="center"):
        _triton().centered_softmax_cross_entropy(student, teacher, center[:5], 0.1, 0.04)
    with pytest.raises(ValueError, match="student and teacher"):
        _triton().centered_softmax_cross_entropy(student, teacher[:, :5], center, 0.1, 0.04)


@pytest.mark.interpreter
@pytest.mark.parametrize(("M", "compute_grad", "teacher_sum"), [(5, True, True), (5, False, False), (0, True, True)])
def test_opcheck(triton_device: str, M: int, compute_grad: bool, teacher_sum: bool) -> None:
    temperatures = _triton().temperature_tensor(0.1, 0.04, triton_device)  # importing the module registers the op
    student, teacher, center = _inputs(M, 37, triton_device)
    student.requires_grad_(compute_grad)
    args = (student, teacher, center, temperatures, compute_grad, teacher_sum)
    torch.library.opcheck(torch.ops.ibot.centered_softmax_ce_fwd.default, args)


@pytest.mark.interpreter
@pytest.mark.slow
def test_torch_compile_fullgraph(triton_device: str) -> None:
    """The custom op traces into one graph with its backward (Inductor, ~20 s on CPU)."""
    ce_triton = _triton()
    student, teacher, center = _inputs(7, 1000, triton_device)

    def loss(s, t, c):
        return ce_triton.centered_softmax_cross_entropy(s, t, c, 0.1, 0.04).mean()

    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    torch.compile(loss, fullgraph=True)(s1, teacher, center).backward()
    loss(s2, teacher, center).backward()
    torch.testing.assert_close(s1.grad, s2.grad, **tol(torch.float32))


@pytest.mark.interpreter
def test_torch_compile_does_not_specialize_on_temperature(triton_device: str) -> None:
    """A scheduled teacher temperature must not recompile the graph at every step."""
    ce_triton = _triton()
    student, teacher, center = _inputs(7, 100, triton_device)
    student.requires_grad_()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # AOT autograd is where float inputs get specialized
    compiled = torch.compile(
        lambda s, temp: ce_triton.centered_softmax_cross_entropy(s, teacher, center, 0.1, temp).mean(),
        backend=counter,
    )
    for teacher_temp in (0.04, 0.041, 0.042, 0.043, 0.044):
        compiled(student, teacher_temp).backward()
    assert counter.frame_count <= 2, f"{counter.frame_count} graphs"  # the first value, then a graph input


# ---- GPU: low precision by the FlashAttention rule, large K --------------------------------------------------


def _eager_low_precision(student, teacher, center, student_temp, teacher_temp):
    """The eager formula with every op in the input dtype: what 'the reference run in bf16' means."""
    p = torch.softmax((teacher - center.to(teacher.dtype)) / teacher_temp, dim=-1)
    return -(p * torch.log_softmax(student / student_temp, dim=-1)).sum(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("M", "K"), [(3763, 8192), (256, 65536), (64, 131072)])
def test_low_precision_within_2x_of_reference_error(cuda_device: str, dtype: torch.dtype, M: int, K: int) -> None:
    student, teacher, center = _inputs(M, K, cuda_device, dtype=dtype)
    ce, _, grad = _run(_triton().centered_softmax_cross_entropy, student, teacher, center, 0.1, 0.04)
    ce_32, _, grad_32 = _run(ce_reference, student.float(), teacher.float(), center, 0.1, 0.04)
    ce_low, _, grad_low = _run(_eager_low_precision, student, teacher, center, 0.1, 0.04)
    assert_within_2x_reference(ce, ce_low, ce_32)
    assert_within_2x_reference(grad, grad_low, grad_32)


@pytest.mark.gpu
@pytest.mark.parametrize(("M", "K"), [(3763, 8192), (300, 65537), (7, 131072)])
def test_gpu_fp32_large(cuda_device: str, M: int, K: int) -> None:
    _assert_matches_reference(*_inputs(M, K, cuda_device), 0.1, 0.04)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile(cuda_device: str) -> None:
    ce_triton = _triton()
    student, teacher, center = _inputs(64, 8192, cuda_device, dtype=torch.bfloat16)
    student.requires_grad_()
    temperatures = ce_triton.temperature_tensor(0.1, 0.04, cuda_device)
    torch.library.opcheck(
        torch.ops.ibot.centered_softmax_ce_fwd.default, (student, teacher, center, temperatures, True, True)
    )
    compiled = torch.compile(lambda s: ce_triton.centered_softmax_cross_entropy(s, teacher, center, 0.1, 0.04).mean())
    compiled(student).backward()
    grad = student.grad.clone()
    student.grad = None
    ce_reference(student, teacher, center, 0.1, 0.04).mean().backward()
    torch.testing.assert_close(grad.float(), student.grad.float(), atol=1e-3, rtol=2**-7)
