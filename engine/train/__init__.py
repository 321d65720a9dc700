"""Pretraining: the loop (`loop.py`), the trainer it drives (`trainer.py`), one optimizer step (`step.py`), its
checkpoint state (`state.py`), optimizer, schedules and the DDP / FSDP2 wrapping (`parallel.py`)."""
