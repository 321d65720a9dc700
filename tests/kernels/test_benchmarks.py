"""The kernel benchmark script runs (CPU smoke mode), so it cannot rot, and writes only where it is told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_cpu_quick(tmp_path: Path) -> None:
    out = tmp_path / "kernels_cpu.md"
    results = REPO_ROOT / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir()) if results.exists() else []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ibot_benchmarks.kernels", "--device", "cpu", "--quick", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = out.read_text()
    for expected in (
        "| ibot_ce | 64 x 1000 | fp32 | fwd+bwd | reference |",
        "| ibot_ce | 37 x 4096 | bf16 | fwd |",
        "| ema | tiny ViT",
        "torch: ",
        "command: ",
    ):
        assert expected in report
    after = sorted(p.name for p in results.iterdir()) if results.exists() else []
    assert after == before, "the CPU smoke run must not write into benchmarks/results/"
