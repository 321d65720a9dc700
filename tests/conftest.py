"""The suite's shared fixtures: a fixed seed for every test, and the tiny engine configuration.

The tiny configuration itself (`TINY_OVERRIDES`, `tiny_config(*extra)`) and `read_metrics` live in tests/helpers.py,
an ordinary module that test modules, module-level helpers and the scripts tests start can import; `tiny_cfg` hands
it to a test as a fixture. Kernel-only fixtures (where Triton really runs) are in tests/kernels/conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from ibot_engine.config import Config
from tests.helpers import tiny_config


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny_cfg() -> Config:
    """The tiny but real configuration (tests/helpers.py) as a `Config`."""
    return tiny_config()
