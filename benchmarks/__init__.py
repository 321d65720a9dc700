"""Benchmark scripts (not tests): `python -m ibot_benchmarks.kernels`. Reports go to `benchmarks/results/`."""
