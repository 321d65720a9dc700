"""AdamW with decay / no-decay groups, scheduled hyperparameters, gradient clipping without host syncs.

Groups as in the official `get_params_groups` (bytedance/ibot `utils.py`): biases and 1-D parameters (norms,
LayerScale) are not decayed; everything else is (pos-embed, cls and mask tokens, the head's weight_v, and weight_g
when trainable).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ibot_engine.accel import apex_usable, fused_adam
from ibot_engine.config import OptimConfig


def param_groups(model: nn.Module, decay_all: bool = False) -> list[dict]:
    """Decay / no-decay groups, each split by whether it is the head's last layer (which can be frozen early).
    `decay_all` puts every parameter in the decayed groups, as lightly's example does."""
    decay, no_decay, last_decay, last_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_last = "last_layer" in name
        if not decay_all and (name.endswith(".bias") or p.ndim <= 1):
            (last_no_decay if is_last else no_decay).append(p)
        else:
            (last_decay if is_last else decay).append(p)
    groups = [
        {"params": decay, "decay": True, "last_layer": False},
        {"params": no_decay, "decay": False, "last_layer": False},
        {"params": last_decay, "decay": True, "last_layer": True},
        {"params": last_no_decay, "decay": False, "last_layer": True},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.impl == "apex" and apex_usable("optim.impl", device):
        return fused_adam(param_groups(model, cfg.decay_all), cfg.betas)  # NVIDIA apex FusedAdam, AdamW mode
    # fused AdamW: one kernel for all parameters on CUDA (and a vectorised CPU kernel); foreach elsewhere.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg.decay_all), lr=0.0, betas=cfg.betas, weight_decay=0.0, fused=fused)


def last_layer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups if g["last_layer"] for p in g["params"]]


def apply_hyperparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group["decay"] else 0.0


@torch.no_grad()
def clip_gradients_(params: list[Tensor], max_norm: float, mode: str) -> Tensor:
    """Clip in place and return the global gradient norm (a device tensor: reading it is the caller's sync).

    global: one norm over all gradients (torch's foreach clip). per_param: the official rule, each tensor scaled
    by min(1, max_norm / (||g|| + 1e-6)), done with foreach ops instead of the official per-tensor `.item()` loop.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm <= 0:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    scales = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)
    return total
