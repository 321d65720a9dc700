"""Benchmark scripts (not tests): `python -m benchmarks.kernels`. Reports go to `benchmarks/results/`."""
