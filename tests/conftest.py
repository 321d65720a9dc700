"""Shared fixtures of the whole suite: a fixed seed for every test, and the tiny engine configuration.

`TINY_OVERRIDES` and `read_metrics` live in tests/helpers.py (plain constants and functions that test modules and the
scripts they start import); the fixtures here hand them to tests that take them as arguments. Kernel-only fixtures
(where Triton really runs) are in tests/kernels/conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import Config, load_config
from tests.helpers import TINY_OVERRIDES


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny_cfg() -> Config:
    """The tiny but real configuration (tests/helpers.py: TINY_OVERRIDES) as a `Config`."""
    return load_config(None, TINY_OVERRIDES)
