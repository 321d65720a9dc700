"""Tolerances and comparisons shared by the kernel tests (one table, reasons written down)."""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

# atol, rtol per dtype. fp32: Liger's 1e-5. Low precision is checked by the FlashAttention rule instead (error vs
# the fp32 reference at most 2x the error of the reference run in that dtype), see `assert_within_2x_reference`.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}

# The interpreter rounds fp32 -> bf16 toward zero (torch rounds to nearest even): bf16 outputs of interpreted kernels
# are compared with one bf16 ulp of relative slack.
BF16_INTERPRETER_RTOL = 2.0**-7


def tol(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_within_2x_reference(out: torch.Tensor, out_low_ref: torch.Tensor, out_fp32_ref: torch.Tensor) -> None:
    """FlashAttention's rule: |out - fp32 ref| <= 2 |low-precision ref - fp32 ref| (max over elements)."""
    err = (out.float() - out_fp32_ref.float()).abs().max().item()
    ref_err = (out_low_ref.float() - out_fp32_ref.float()).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"max error {err:.3e} > 2 x reference error {ref_err:.3e}"
