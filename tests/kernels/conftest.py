"""Fixtures for kernel tests: where Triton really runs (the seed is tests/conftest.py's, the tolerances are in
kernel_helpers.py).

Kernel tests call the Triton entry points directly and take the `triton_device` fixture, which skips unless the
kernel truly runs (CUDA, or CPU tensors with TRITON_INTERPRET=1), so a CPU run never compares the reference with
itself. `test_interpreter_suite.py` re-runs the `interpreter`-marked tests in a child process with
TRITON_INTERPRET=1 (the variable must be set before `@triton.jit` executes, i.e. before kernels are imported).
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_helpers import HAS_TRITON


@pytest.fixture
def triton_device() -> str:
    """Device whose tensors run the Triton kernels; skips where Triton cannot run."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def cuda_device() -> str:
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA without the interpreter")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return "cuda"
