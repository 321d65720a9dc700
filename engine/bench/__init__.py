"""`ibot bench` and `ibot profile`: the real training step timed (harness, timing), lightly's iBOT example beside it
(lightly_example, timed by lightly_peer), and the header and folder of every results file (report)."""
