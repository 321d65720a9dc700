"""AdamW with decay / no-decay groups, scheduled hyperparameters, gradient clipping without host syncs.

Groups as in the official `get_params_groups` (bytedance/ibot `utils.py`): biases and 1-D parameters (norms,
LayerScale) are not decayed; everything else is (pos-embed, cls and mask tokens, the head's weight_v, and weight_g
when trainable).

Each group also carries an `lr_scale`, the factor `apply_hyperparams` puts on the scheduled lr: layer-wise lr decay
(`optim.layer_decay`) and the patch-embedding multiplier (`optim.patch_embed_lr_mult`), DINOv2's / BEiT's rule
(dinov2 `utils/param_groups.py`, `get_vit_lr_decay_rate`): with D blocks, the patch embedding, cls / register /
mask tokens and position embedding are layer 0, block i is layer i + 1, and the final norm and the head are layer
D + 1; a parameter of layer l gets layer_decay ** (D + 1 - l), times `patch_embed_lr_mult` for the patch embedding.
Parameters of equal scale share a group, so the defaults (1.0 and 1.0) give today's four groups exactly. With
`split_backbone` (`train.unfreeze_warmup_steps`) the backbone's parameters also get groups of their own, flagged
`backbone`, whose lr `apply_hyperparams` scales by the step's `backbone_lr_factor`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ibot_engine.accel import apex_usable, fused_adam
from ibot_engine.config import OptimConfig

# Backbone parameters of layer 0 (before the first block), by their name under `backbone.`.
_EMBEDDING_NAMES = ("patch_embed.", "cls_token", "pos_embed", "register_tokens", "mask_token")


def layer_id(name: str, depth: int) -> int:
    """The layer of a student parameter by its name (`backbone.*` / `head.*`) for layer-wise lr decay: 0 for the
    embeddings and tokens, i + 1 for block i, depth + 1 for the final norm, the head and anything else."""
    if not name.startswith("backbone."):
        return depth + 1
    rest = name.removeprefix("backbone.")
    if rest.startswith(_EMBEDDING_NAMES):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def lr_scale(name: str, depth: int, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> float:
    """The lr factor of a student parameter: layer_decay ** (depth + 1 - layer), times `patch_embed_lr_mult` for
    the patch embedding."""
    scale = layer_decay ** (depth + 1 - layer_id(name, depth))
    if name.startswith("backbone.patch_embed."):
        scale *= patch_embed_lr_mult
    return scale


def param_groups(model: nn.Module, decay_all: bool = False, layer_decay: float = 1.0,
                 patch_embed_lr_mult: float = 1.0, split_backbone: bool = False) -> list[dict]:
    """Decay / no-decay groups, each split by whether it is the head's last layer (which can be frozen early), by
    lr scale and, with `split_backbone`, by whether it is the backbone's (module docstring). `decay_all` puts every
    parameter in the decayed groups, as lightly's example does. Built once: the optimizer step reads each group's
    `lr_scale` and `backbone`, nothing per parameter."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    depth = len({name.split(".")[2] for name, _ in named if name.startswith("backbone.blocks.")})
    # Kinds in the order of the official groups: decay, no decay, last-layer decay, last-layer no decay.
    groups: dict[tuple[int, float], dict] = {}
    for name, p in named:
        is_last = "last_layer" in name
        decay = decay_all or not (name.endswith(".bias") or p.ndim <= 1)
        scale = lr_scale(name, depth, layer_decay, patch_embed_lr_mult)
        backbone = split_backbone and name.startswith("backbone.")
        key = (2 * is_last + (not decay), scale, backbone)
        if key not in groups:
            groups[key] = {"params": [], "decay": decay, "last_layer": is_last, "lr_scale": scale,
                           "backbone": backbone}
        groups[key]["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda k: k[0])]  # stable: scales in order of appearance


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    split_backbone: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model)` with the config's grouping and lr scales (and the backbone in groups of its
    own with `split_backbone`); lr and weight decay are set every step by `apply_hyperparams`."""
    groups = param_groups(model, cfg.decay_all, cfg.layer_decay, cfg.patch_embed_lr_mult, split_backbone)
    if cfg.impl == "apex" and apex_usable("optim.impl", device):
        return fused_adam(groups, cfg.betas)  # NVIDIA apex FusedAdam, AdamW mode
    # fused AdamW: one kernel for all parameters on CUDA (and a vectorised CPU kernel); foreach elsewhere.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, weight_decay=0.0, fused=fused)


def last_layer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups if g["last_layer"] for p in g["params"]]


def apply_hyperparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                      backbone_lr_factor: float = 1.0) -> None:
    """This step's lr (times each group's `lr_scale`, and `backbone_lr_factor` for the groups flagged `backbone`)
    and weight decay (decayed groups only) into the groups. AdamW decays by lr x weight_decay, so a scaled group's
    decay is scaled with it (as in DINOv2 and BEiT)."""
    for group in optimizer.param_groups:
        # .get: a checkpoint saved before the `backbone` flag existed restores its groups without it.
        group["lr"] = lr * group["lr_scale"] * (backbone_lr_factor if group.get("backbone") else 1.0)
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
