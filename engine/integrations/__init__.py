"""Doors into other training frameworks (PyTorch Lightning); the engine itself never imports them."""
