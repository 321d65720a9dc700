"""ibot-engine: iBOT self-supervised pretraining of Vision Transformers (PyTorch + Triton)."""

__version__ = "0.1.0"
