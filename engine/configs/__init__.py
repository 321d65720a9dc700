"""Presets that ship with the package (found wherever it is installed): `small_data.yaml`, the recipe for small data
sets at 32 to 64 px, and `demo_cpu.yaml`, the config of `ibot demo` (built on it). The cluster presets stay in the
repository's `launch/configs/`, next to the launchers that use them."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
DEMO_CONFIG = CONFIG_DIR / "demo_cpu.yaml"
SMALL_DATA_CONFIG = CONFIG_DIR / "small_data.yaml"


def config_path(name: str) -> Path | None:
    """The packaged config called `name` (with or without `.yaml`), or None."""
    path = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if path.is_file() else None
