"""Presets that ship with the package: `demo_cpu.yaml`, the config of `ibot demo` (found wherever the package is
installed). The cluster presets stay in the repository's `launch/configs/`, next to the launchers that use them."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
DEMO_CONFIG = CONFIG_DIR / "demo_cpu.yaml"
