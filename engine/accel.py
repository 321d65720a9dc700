"""Optional accelerators detected at run time: NVIDIA apex (FusedAdam, FusedLayerNorm). The model's norm factory
(`ibot_engine.model.vit.norm_layer`) and the optimizer builder ask here; this module imports neither.

NVIDIA apex is built from source against the installed torch and CUDA; it is never a dependency. The PyPI package
that is also named `apex` is an unrelated web toolkit: it imports as `apex` but has no `apex.optimizers`, so we
check for `apex.optimizers.FusedAdam` (and `apex.normalization.FusedLayerNorm`), and ignore an `apex` without them.
When a config asks for apex and it is not usable, we say so once and carry on with torch's fused kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)


@functools.cache
def nvidia_apex() -> ModuleType | None:
    """The NVIDIA apex package if it is installed with its CUDA extensions, else None (the reason is logged)."""
    if importlib.util.find_spec("apex") is None:
        return None
    try:
        apex = importlib.import_module("apex")
        importlib.import_module("apex.optimizers").FusedAdam  # noqa: B018
        importlib.import_module("apex.normalization").FusedLayerNorm  # noqa: B018
    except (ImportError, AttributeError) as err:
        origin = getattr(importlib.util.find_spec("apex"), "origin", None)
        log.warning("an 'apex' package is installed (%s) but it is not NVIDIA apex with its CUDA extensions (%s); "
                    "ignoring it. (PyPI's 'apex' is an unrelated web toolkit.)", origin, err)
        return None
    return apex


@functools.cache
def _say_once(what: str, device_type: str) -> None:
    why = "NVIDIA apex is not installed" if nvidia_apex() is None else f"apex needs CUDA tensors, not {device_type}"
    log.warning("%s=apex asked for, but %s: using torch's kernel instead", what, why)


def apex_usable(what: str, device: torch.device) -> bool:
    """Whether `what` (a config key set to apex) can use apex on `device`; if not, say so once."""
    if nvidia_apex() is not None and device.type == "cuda":
        return True
    _say_once(what, device.type)
    return False


def fused_adam(param_groups: list[dict], betas: tuple[float, float]) -> torch.optim.Optimizer:
    """apex FusedAdam in AdamW mode (decoupled weight decay), like torch.optim.AdamW(fused=True)."""
    return nvidia_apex().optimizers.FusedAdam(param_groups, lr=0.0, betas=betas, weight_decay=0.0,
                                              adam_w_mode=True, eps=1e-8)
