"""Parameter groups and clipping (global and the official per-parameter rule) without host syncs."""

from __future__ import annotations

import pytest
import torch

from ibot_engine.config import LossConfig, ModelConfig
from ibot_engine.model.ibot import IBOT
from ibot_engine.train.optim import apply_hyperparams, clip_gradients_, param_groups


def test_groups_follow_the_official_rule():
    model = IBOT(ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, out_dim=16, head_hidden_dim=8,
                             head_bottleneck_dim=4), LossConfig())
    groups = param_groups(model.student)
    names = {id(p): n for n, p in model.student.named_parameters()}
    by_group = {(g["decay"], g["last_layer"]): {names[id(p)] for p in g["params"]} for g in groups}
    decayed = by_group[(True, False)]
    assert "backbone.pos_embed" in decayed and "backbone.mask_token" in decayed and "backbone.cls_token" in decayed
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    assert "backbone.blocks.0.norm1.weight" in by_group[(False, False)]
    assert by_group[(True, True)] == {"head.last_layer.weight_v", "head.last_layer.weight_g"}


def test_decay_all_decays_every_trainable_parameter():
    """optim.decay_all (lightly's example): one decayed group besides the last layer, biases and norms included."""
    model = IBOT(ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, out_dim=16, head_hidden_dim=8,
                             head_bottleneck_dim=4, layerscale=1e-5), LossConfig())
    groups = param_groups(model.student, decay_all=True)
    assert all(g["decay"] for g in groups)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.student.parameters() if p.requires_grad}
    last = next(g for g in groups if g["last_layer"])
    assert len(last["params"]) == 2  # weight_v, weight_g: still freezable on their own


def test_split_backbone_gives_the_backbone_its_own_groups_and_only_they_take_the_ramp():
    """split_backbone (train.unfreeze_warmup_steps): the same parameters, decay and lr scales, with no group mixing
    backbone and heads; apply_hyperparams scales only the backbone's groups by backbone_lr_factor. Without it the
    groups are the official ones (one per kind), none flagged."""
    model = IBOT(ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, out_dim=16, head_hidden_dim=8,
                             head_bottleneck_dim=4), LossConfig())
    names = {id(p): n for n, p in model.student.named_parameters()}
    plain = param_groups(model.student)
    assert len(plain) == len({(g["decay"], g["last_layer"]) for g in plain}) and not any(g["backbone"] for g in plain)
    split = param_groups(model.student, layer_decay=0.5, split_backbone=True)
    for g in split:
        assert {names[id(p)].startswith("backbone.") for p in g["params"]} == {g["backbone"]}
    assert sorted(names[id(p)] for g in split for p in g["params"]) == sorted(names.values())
    scale = {names[id(p)]: g["lr_scale"] for g in split for p in g["params"]}
    assert scale == {names[id(p)]: g["lr_scale"] for g in param_groups(model.student, layer_decay=0.5)
                     for p in g["params"]}
    optimizer = torch.optim.AdamW(split)
    apply_hyperparams(optimizer, lr=0.1, weight_decay=0.04, backbone_lr_factor=0.25)
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_scale"] * (0.25 if g["backbone"] else 1.0))


def official_per_param_clip(params, clip):
    """Port of bytedance/ibot utils.clip_gradients (per-tensor norm with a Python loop)."""
    norms = []
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def test_per_param_clipping_matches_official_loop():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2, 2, 2), (7,)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q, scale in zip(ours, ref, [10.0, 0.1, 3.0, 1.0], strict=True):
        g = torch.randn_like(p) * scale
        p.grad, q.grad = g.clone(), g.clone()
    official_per_param_clip(ref, 3.0)
    total = clip_gradients_(ours, 3.0, "per_param")
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert total.ndim == 0


def test_global_clipping_matches_torch():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    for p in ours:
        p.grad = torch.randn_like(p) * 5
    grads = [p.grad.clone() for p in ours]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    total = clip_gradients_(ours, 3.0, "global")
    torch.testing.assert_close(total, norm)
    for p, g in zip(ours, grads, strict=True):
        torch.testing.assert_close(p.grad, g * (3.0 / (norm + 1e-6)))
