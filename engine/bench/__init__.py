"""`ibot bench` and `ibot profile`: the real training step timed (harness, timing, report), lightly's step beside it."""
