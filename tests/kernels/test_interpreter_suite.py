"""Run the `interpreter`-marked kernel tests in a child process with TRITON_INTERPRET=1.

The variable must be set before `@triton.jit` executes, i.e. before any kernel module is imported, so the in-process
copies of those tests skip on a CPU machine and this test runs them for real. It fails unless the child ran tests
and none failed or was skipped (a skip there would mean a kernel test compared nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from kernel_helpers import HAS_TRITON

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the interpreter-marked tests run on the GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process already runs them")
def test_interpreter_marked_kernel_tests_pass(tmp_path: Path) -> None:
    report = tmp_path / "interpreter.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "IBOT_KERNELS": "auto"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "interpreter and not slow",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        str(Path(__file__).parent),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"interpreter run failed (rc {result.returncode}):\n{tail}"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ran = counts["tests"] - counts["skipped"]
    assert ran > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, f"{counts}\n{tail}"
