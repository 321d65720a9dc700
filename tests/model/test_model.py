"""ViT, head and the student/teacher pair: gradients, masking semantics, position-embedding resampling, EMA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ibot_engine.config import LossConfig, ModelConfig
from ibot_engine.model.head import IBOTHead
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.vit import VisionTransformer

TINY = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, out_dim=64, head_hidden_dim=32,
                   head_bottleneck_dim=16, drop_path=0.1)


def _model(**loss_kw) -> IBOT:
    torch.manual_seed(0)
    return IBOT(TINY, LossConfig(**loss_kw))


def test_every_trainable_student_param_gets_a_gradient_and_no_teacher_param_does():
    model = _model()
    B, G, L = 2, 2, 2
    g = torch.randn(G * B, 3, 32, 32)
    loc = torch.randn(L * B, 3, 16, 16)
    masks = torch.zeros(G * B, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[3, 1:, 1:] = True
    idx = masks.flatten().nonzero().squeeze(1)
    teacher = model.teacher_forward(g, idx)
    s_cls, s_patch, _ = model.student(g, idx, masks, loc)
    assert s_cls.shape == (2 * B + L * B, 64) and s_patch.shape == (idx.numel(), 64)
    loss = (s_cls.logsumexp(-1).sum() + s_patch.logsumexp(-1).sum() + (s_cls[:4] * teacher.cls_logits).sum())
    loss.backward()
    for name, p in model.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for student {name}"
    for name, p in model.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, f"teacher {name} has a gradient"


def test_teacher_has_no_mask_token_and_starts_equal_to_student():
    model = _model()
    assert model.student.backbone.mask_token is not None
    assert model.teacher.backbone.mask_token is None
    teacher_pairs, student_pairs = model.ema_pairs()
    assert len(teacher_pairs) == len(list(model.student.parameters())) - 1  # all but the mask token
    for t, s in zip(teacher_pairs, student_pairs, strict=True):
        assert torch.equal(t, s)


def test_mask_token_replaces_masked_patches_before_position_embedding():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, mask_token=True)
    with torch.no_grad():
        vit.mask_token.normal_()
    images = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = True
    tokens = vit.prepare_tokens(images, masks)
    pos = vit.pos_embed[0]
    # token 1 + (1 * 4 + 2) is the masked one: mask token + its own position embedding
    torch.testing.assert_close(tokens[0, 1 + 6], vit.mask_token[0] + pos[1 + 6])
    unmasked = vit.prepare_tokens(images, None)
    torch.testing.assert_close(tokens[0, :7], unmasked[0, :7])  # cls and the other patches untouched
    torch.testing.assert_close(tokens[0, 8:], unmasked[0, 8:])


def test_resampled_position_embedding_equals_bicubic_interpolation():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=16, img_size=224)
    D = vit.embed_dim
    grid = vit.pos_embed[0, 1:].reshape(1, 14, 14, D).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    got = vit.pos_embed_for(6, 6)
    torch.testing.assert_close(got[0, 1:], expected.reshape(36, D), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0, 0], vit.pos_embed[0, 0])
    # cached resampling weights, but the embedding follows the parameter after an update
    with torch.no_grad():
        vit.pos_embed.add_(1.0)
    torch.testing.assert_close(vit.pos_embed_for(6, 6)[0, 1:], got[0, 1:] + 1.0, atol=1e-5, rtol=1e-5)


def test_teacher_ema_matches_formula():
    model = _model()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in model.ema_pairs()[0]]
    model.update_teacher(0.9)
    for t0, t, s in zip(before, *model.ema_pairs(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_norm_last_layer_freezes_gain():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**{f: getattr(TINY, f) for f in TINY.__slots__}, "norm_last_layer": True})
    model = IBOT(cfg, LossConfig())
    assert not model.student.head.last_layer.weight_g.requires_grad
    logits = model.student.head(torch.randn(5, 192))  # 192: the vit_tiny width
    assert logits.abs().max() <= 1.0 + 1e-5  # exact cosines


def test_patch_center_rules():
    g = torch.randn(4, 3, 32, 32)
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[1, 0] = True
    idx = masks.flatten().nonzero().squeeze(1)
    out_all = _model(patch_center="all").teacher_forward(g, idx)
    out_masked = _model(patch_center="masked").teacher_forward(g, idx)
    assert out_all.patch_count == 4 * 16 and out_masked.patch_count == 4
    torch.testing.assert_close(out_all.patch_logits, out_masked.patch_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_masked.patch_sum, out_masked.patch_logits.sum(0))


def test_init_schemes_draw_the_documented_scales():
    torch.manual_seed(0)
    official = VisionTransformer("vit_tiny", patch_size=8, img_size=32)
    xavier = VisionTransformer("vit_tiny", patch_size=8, img_size=32, init="xavier")
    qkv_o, qkv_x = official.blocks[0].attn.qkv.weight, xavier.blocks[0].attn.qkv.weight  # [576, 192]
    assert float(qkv_o.std()) == pytest.approx(0.02, rel=0.05)
    assert float(qkv_x.std()) == pytest.approx((2 / (192 + 576)) ** 0.5, rel=0.05)  # Xavier-uniform
    assert float(qkv_x.abs().max()) <= (6 / (192 + 576)) ** 0.5
    patch_x = xavier.patch_embed.weight.reshape(192, -1)  # Xavier over [D, 3 * p * p]
    assert float(patch_x.std()) == pytest.approx((2 / (192 + 192)) ** 0.5, rel=0.05)
    for vit in (official, xavier):
        assert float(vit.pos_embed.std()) == pytest.approx(0.02, rel=0.1) and vit.blocks[0].attn.qkv.bias.eq(0).all()
    with pytest.raises(ValueError, match=r"model\.init='kaiming'"):
        VisionTransformer("vit_tiny", patch_size=8, img_size=32, init="kaiming")


def test_networks_return_the_global_crops_backbone_cls_tokens():
    model = _model()
    model.eval()
    g, loc = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    idx = masks.flatten().nonzero().squeeze(1)
    out = model.student(g, idx, masks, loc)
    torch.testing.assert_close(out.cls_tokens, model.student.backbone(g)[:, 0])
    torch.testing.assert_close(model.teacher_forward(g, idx).cls_tokens, model.teacher.backbone(g)[:, 0])


def test_head_last_layer_starts_like_the_official_head():
    """v ~ nn.Linear's default U(+-1/sqrt(256)) (the official head builds its last layer after the trunc-normal init
    of the MLP), g = 1; the MLP keeps trunc_normal(0.02)."""
    torch.manual_seed(0)
    head = IBOTHead(192, 4096, hidden_dim=512, bottleneck_dim=256)
    v = head.last_layer.weight_v
    assert float(v.abs().max()) <= 1 / 16 and float(v.std()) == pytest.approx(1 / 16 / 3**0.5, rel=0.02)
    assert head.last_layer.weight_g.eq(1).all()
    assert float(head.mlp[0].weight.std()) == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("uniform", [False, True])
def test_drop_path_rates_over_depth(uniform):
    """Linear from 0 at the first block to `drop_path` at the last (official), or `drop_path` everywhere."""
    model = IBOT(ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, out_dim=64, head_hidden_dim=32,
                             head_bottleneck_dim=16, drop_path=0.2, drop_path_uniform=uniform), LossConfig())
    rates = [b.drop_path for b in model.student.backbone.blocks]
    expected = [0.2] * 12 if uniform else [0.2 * i / 11 for i in range(12)]
    assert rates == pytest.approx(expected)
    assert all(b.drop_path == 0 for b in model.teacher.backbone.blocks)


def test_independent_teacher_head_copies_only_the_backbone():
    """model.teacher_head=independent: same backbone, a head of the same init family drawn separately; the student
    (and so the RNG stream the student's init consumed) is the same as with the default copy."""
    torch.manual_seed(0)
    copied = IBOT(TINY, LossConfig())
    torch.manual_seed(0)
    own = IBOT(dataclasses.replace(TINY, teacher_head="independent"), LossConfig())
    for (name, a), b in zip(own.student.state_dict().items(), copied.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, t in own.teacher.state_dict().items():
        s = own.student.state_dict()[name]
        if name.startswith("backbone."):
            assert torch.equal(t, s), name
        elif name.endswith("weight_g") or name.endswith("bias"):
            assert torch.equal(t, s), name  # gains start at 1, biases at 0 in both heads
        else:
            assert not torch.equal(t, s), name
            assert float(t.std()) == pytest.approx(float(s.std()), rel=0.1), name  # the same init distribution
