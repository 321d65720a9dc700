"""What released DINOv2 / DINOv3 backbones need from our ViT: registers, DINOv3's RoPE, the LayerNorm eps, SwiGLU and
the zeroed K bias, against timm's implementations of those models (random weights, copied into ours by a key map), and
kept working through crop packing, activation checkpointing, compile and the iBOT network's token slicing.

The loaders' parity through the released file formats is tested with the loaders; this file proves the model's math.
"""

from __future__ import annotations

import pytest
import timm
import torch

from ibot_engine.config import ConfigError, LossConfig, ModelConfig, load_config
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.vit import VisionTransformer, swiglu_hidden

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOL = 1e-5  # fp32; the two implementations order a few reductions differently


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn N(0, 0.1) (LayerNorm gains 1 + N(0, 0.1)): biases, LayerScale and tokens all matter to
    the comparison (timm's init leaves many at exactly 0 or 1, which would hide a missing or misplaced term)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if gain else 0.0))


def _ours_from_timm(timm_state: dict[str, torch.Tensor], *, fold_cls_pos: bool = False,
                    k_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """timm's DINOv2 (VisionTransformer) or DINOv3 (Eva) keys -> ours. `fold_cls_pos`: timm's register models keep no
    cls position (no_embed_class); ours has a cls slot in pos_embed, set to zero. `k_bias`: the K third to place
    between timm's q_bias and v_bias (timm has none)."""
    swiglu = any("mlp.fc1_g" in k for k in timm_state)
    renames = {"patch_embed.proj.": "patch_embed.", "reg_token": "register_tokens", ".gamma_1": ".ls1.gamma",
               ".gamma_2": ".ls2.gamma", "mlp.fc1_g.": "mlp.w1.", "mlp.fc1_x.": "mlp.w2.",
               **({"mlp.fc2.": "mlp.w3."} if swiglu else {})}
    out = {}
    for key, value in timm_state.items():
        if key.endswith("attn.v_bias"):
            continue
        if key.endswith("attn.q_bias"):
            v_bias = timm_state[key.replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, k_bias, v_bias])
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    if fold_cls_pos:
        out["pos_embed"] = torch.cat([torch.zeros_like(out["pos_embed"][:, :1]), out["pos_embed"]], dim=1)
    return out


def _timm_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images)


def _our_tokens(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vit.eval()(images)


def _assert_tokens_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err < TOL, f"max |ours - timm| = {err:.3g}"


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_tokens_equal_timms(registers):
    """timm's DINOv2 ViT-S/14 (with 4 registers: `vit_small_patch14_reg4_dinov2`): LayerScale, learned positions,
    registers after cls without a position. cls, register and patch tokens within 1e-5."""
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=56).eval()
    _randomise(reference, seed=1)
    vit = VisionTransformer("vit_small", patch_size=14, img_size=56, layerscale=1e-5, num_register_tokens=registers)
    missing = vit.load_state_dict(_ours_from_timm(reference.state_dict(), fold_cls_pos=bool(registers)))
    assert not missing.missing_keys and not missing.unexpected_keys
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    ours, theirs = _our_tokens(vit, images), _timm_tokens(reference, images)
    assert ours.shape == (2, 1 + registers + 16, 384)
    _assert_tokens_equal(ours, theirs)


def _dinov3_pair(name: str, *, qkv_k_bias: bool, ffn: str = "mlp", arch: str = "vit_small"):
    """timm's DINOv3 model `name` (random weights) and ours with its weights; the K bias we add is random, so it
    changes the output unless it is zeroed."""
    reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=64, global_pool="token").eval()
    _randomise(reference, seed=3)
    vit = VisionTransformer(arch, patch_size=16, img_size=64, layerscale=1e-5, num_register_tokens=4,
                            pos_embed="rope", rope_base=100.0, norm_eps=1e-5, ffn=ffn, qkv_k_bias=qkv_k_bias)
    k_bias = torch.randn(384, generator=torch.Generator().manual_seed(4))
    loaded = vit.load_state_dict(_ours_from_timm(reference.state_dict(), k_bias=k_bias))
    assert not loaded.missing_keys and not loaded.unexpected_keys
    return reference, vit


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_dinov3_tokens_equal_timms_at_two_sizes(size):
    """timm's DINOv3 ViT-S/16 with q / v biases (`vit_small_patch16_dinov3_qkvb`: RoPE base 100, 4 storage tokens,
    LayerNorm eps 1e-5, LayerScale): ours with the K bias zeroed gives its tokens at the native 64 px and at a
    non-square 48 x 80 (each axis normalised on its own)."""
    reference, vit = _dinov3_pair("vit_small_patch16_dinov3_qkvb", qkv_k_bias=False)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    ours, theirs = _our_tokens(vit, images), _timm_tokens(reference, images)
    assert ours.shape == (2, 1 + 4 + (size[0] // 16) * (size[1] // 16), 384)
    _assert_tokens_equal(ours, theirs)


def test_the_k_bias_mask_is_what_makes_dinov3_match():
    """Under RoPE a K bias is rotated per key position, so it changes attention: with it kept (qkv_k_bias=true) the
    same weights no longer give timm's tokens. Without RoPE it would cancel in the softmax and prove nothing."""
    reference, vit = _dinov3_pair("vit_small_patch16_dinov3_qkvb", qkv_k_bias=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    assert (_our_tokens(vit, images) - _timm_tokens(reference, images)).abs().max() > 1e-3


def test_dinov3_swiglu_small_plus_equals_timms():
    """DINOv3 ViT-S+ (`vit_small_plus_patch16_dinov3_qkvb`): SwiGLU of width 1536 for ratio 6, keys w1 / w2 / w3."""
    reference, vit = _dinov3_pair("vit_small_plus_patch16_dinov3_qkvb", qkv_k_bias=False, ffn="swiglu",
                                  arch="vit_small_plus")
    assert vit.blocks[0].mlp.w1.weight.shape == (1536, 384) == (swiglu_hidden(384 * 6), 384)
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(6))
    _assert_tokens_equal(_our_tokens(vit, images), _timm_tokens(reference, images))


def test_rope_model_has_no_position_weights_and_no_periods_in_its_state():
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, pos_embed="rope", num_register_tokens=2,
                            qkv_k_bias=False)
    keys = set(vit.state_dict())
    assert "pos_embed" not in keys and not any("period" in k or "bias_mask" in k for k in keys)
    assert vit.state_dict()["register_tokens"].shape == (1, 2, 192)
    assert vit.state_dict()["blocks.0.attn.qkv.bias"].shape == (3 * 192,)
    # The periods are DINOv3's: base ** (4 i / d), d = 64 -> 16 of them from 1 to 100 ** (15 / 16).
    periods = vit.rope_periods()
    assert periods.shape == (16,) and periods[0] == 1.0
    torch.testing.assert_close(periods[-1], torch.tensor(100.0 ** (30 / 32)))


def test_registers_follow_cls_without_a_position_and_the_mask_token_replaces_masked_patches():
    """Learned positions with registers (DINOv2 *_reg): [cls + pos_0, registers, patch or mask token + pos_i]."""
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, mask_token=True, num_register_tokens=2)
    _randomise(vit, seed=9)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, 2, 3] = True
    with torch.no_grad():
        tokens = vit.prepare_tokens(images, masks)
        patches = vit.patch_embed(images).flatten(2).transpose(1, 2)
    pos = vit.pos_embed[0].detach()
    assert tokens.shape == (2, 1 + 2 + 16, 192)
    torch.testing.assert_close(tokens[:, 0], (vit.cls_token[0, 0] + pos[0]).detach().expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:3], vit.register_tokens.detach().expand(2, -1, -1))
    torch.testing.assert_close(tokens[0, 3:], patches[0] + pos[1:])
    masked = 3 + 2 * 4 + 3
    torch.testing.assert_close(tokens[1, masked], (vit.mask_token[0] + pos[1 + 2 * 4 + 3]).detach())
    torch.testing.assert_close(tokens[1, masked + 1], patches[1, masked - 2] + pos[masked - 1])


def _released_like_vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    kw = {"mask_token": True, "layerscale": 0.1, "num_register_tokens": 3, "pos_embed": "rope", "norm_eps": 1e-5,
          "ffn": "swiglu", "qkv_k_bias": False} | overrides
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, **kw)
    _randomise(vit, seed=7)
    return vit.train()


def _inputs():
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(4, 3, 32, 24, generator=gen)
    loc = torch.randn(6, 3, 16, 16, generator=gen)
    m = torch.rand(4, 4, 3, generator=gen) > 0.5
    return g, loc, m


def _tokens_and_grads(vit: VisionTransformer, packed: bool):
    g, loc, m = _inputs()
    vit.zero_grad(set_to_none=True)
    tg, tl = vit.forward_packed([(g, m), (loc, None)]) if packed else (vit(g, m), vit(loc))
    weights = torch.linspace(-1, 1, tg.shape[-1])
    ((tg * weights).sum() + (tl * weights).pow(2).sum()).backward()
    return tg.detach(), tl.detach(), {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}


def _assert_same(a, b, rel: float = 1e-5) -> None:
    (tg_a, tl_a, gr_a), (tg_b, tl_b, gr_b) = a, b
    assert gr_a.keys() == gr_b.keys()
    pairs = {"global": (tg_a, tg_b), "local": (tl_a, tl_b)} | {n: (gr_a[n], gr_b[n]) for n in gr_a}
    for name, (x, y) in pairs.items():
        err, scale = (x - y).abs().max().item(), y.abs().max().item()
        assert err <= rel * max(scale, 1e-3), f"{name}: {err:.3g} vs scale {scale:.3g}"


def test_packed_crops_equal_separate_passes_with_registers_and_rope():
    """Each resolution group gets its own grid's rotation (a non-square global grid here); registers are prefix
    tokens of every crop; the mask token replaces masked patches. Outputs and every parameter's gradient."""
    reference = _tokens_and_grads(_released_like_vit(), packed=False)
    packed = _tokens_and_grads(_released_like_vit(), packed=True)
    _assert_same(packed, reference)
    assert "register_tokens" in reference[2] and "mask_token" in reference[2]


def test_flex_packed_forward_equals_sdpa_with_rope():
    """FlexAttention's packed path rotates the packed rows with the packed table (forward only: no CPU backward)."""
    g, loc, m = _inputs()
    with torch.no_grad():
        reference = _released_like_vit().eval().forward_packed([(g, m), (loc, None)])
        flex = _released_like_vit(attention="flex").eval().forward_packed([(g, m), (loc, None)])
    for a, b in zip(flex, reference, strict=True):  # two kernels, reductions in other orders
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_outputs_and_gradients(mode):
    reference = _tokens_and_grads(_released_like_vit(), packed=False)
    vit = _released_like_vit()
    for block in vit.blocks:
        block.checkpointing = mode
    _assert_same(_tokens_and_grads(vit, packed=False), reference)
    _assert_same(_tokens_and_grads(vit, packed=True), _tokens_and_grads(_released_like_vit(), packed=True))


def test_zeroed_k_bias_gets_no_gradient_and_the_rest_of_the_bias_does():
    vit = _released_like_vit()
    _, _, grads = _tokens_and_grads(vit, packed=False)
    bias_grad = grads["blocks.0.attn.qkv.bias"].chunk(3)
    assert torch.all(bias_grad[1] == 0) and bias_grad[0].abs().sum() > 0 and bias_grad[2].abs().sum() > 0
    _, _, kept = _tokens_and_grads(_released_like_vit(qkv_k_bias=True), packed=False)
    assert kept["blocks.0.attn.qkv.bias"].chunk(3)[1].abs().sum() > 0  # with RoPE a kept K bias does matter


def test_compiled_blocks_have_no_graph_break():
    """fullgraph=True raises on any graph break; the eager backend keeps it quick (no code generation)."""
    vit = _released_like_vit()
    g, loc, m = _inputs()
    reference = vit(g, m), vit.forward_packed([(g, m), (loc, None)])[1]
    torch._dynamo.reset()
    for block in vit.blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    compiled = vit(g, m), vit.forward_packed([(g, m), (loc, None)])[1]
    torch._dynamo.reset()
    for a, b in zip(compiled, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_maps_match_the_kernels():
    """The explicit last-block weights (for visualisation) applied to v reproduce the kernel's attention output."""
    vit = _released_like_vit().eval()
    g, _, _ = _inputs()
    weights = vit.attention_maps(g)
    B, H, T, _ = weights.shape
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))
    with torch.no_grad():
        x = vit.prepare_tokens(g)
        rope = vit.rope_tables([(1, 4, 3)], x.device)
        for block in vit.blocks[:-1]:
            x = block(x, rope=rope)
        attn = vit.blocks[-1].attn
        y = vit.blocks[-1].norm1(x)
        qkv = attn.project_qkv(y).reshape(B, T, 3, H, -1)
        v = qkv[:, :, 2].transpose(1, 2)
        explicit = attn.proj((weights @ v).transpose(1, 2).reshape(B, T, -1))
        torch.testing.assert_close(explicit, attn(y, rope=rope), rtol=1e-5, atol=1e-5)


def test_ibot_network_projects_the_patch_tokens_after_the_registers():
    """Patch logits are the head on tokens 1 + R onwards (not on the registers): the mask indices address patches."""
    cfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, out_dim=32, head_hidden_dim=16,
                      head_bottleneck_dim=8, num_register_tokens=4, pos_embed="rope", norm_eps=1e-5, ffn="swiglu",
                      qkv_k_bias=False, layerscale=1e-5)
    torch.manual_seed(0)
    model = IBOT(cfg, LossConfig())
    backbone = model.teacher.backbone
    assert backbone.num_prefix_tokens == 5 and isinstance(backbone.blocks[0].norm1, torch.nn.LayerNorm)
    assert backbone.blocks[0].norm1.eps == 1e-5 and backbone.norm.eps == 1e-5
    g = torch.randn(4, 3, 32, 32)
    out = model.teacher_forward(g, torch.tensor([0, 17, 63]))
    with torch.no_grad():
        tokens = backbone(g)
        expected = model.teacher.head(tokens[:, 5:].reshape(-1, tokens.shape[-1])[[0, 17, 63]])
    torch.testing.assert_close(out.patch_logits, expected)
    torch.testing.assert_close(out.cls_tokens, tokens[:, 0])


@pytest.mark.parametrize("patch,expected", [(14, 98), (16, 96), (8, 96)])
def test_local_size_auto_is_96_on_the_patch_grid(patch, expected):
    cfg = load_config(None, [f"model.patch_size={patch}", f"model.img_size={16 * patch}",
                             f"data.global_size={16 * patch}"])
    assert cfg.data.local_size == expected


def test_explicit_local_size_is_kept_or_named_in_the_error():
    assert load_config(None, ["data.local_size=112"]).data.local_size == 112
    with pytest.raises(ConfigError, match=r"'data\.local_size' = 96 is not a multiple of model\.patch_size = 14"):
        load_config(None, ["model.patch_size=14", "model.img_size=224", "data.global_size=224",
                           "data.local_size=96"])
    with pytest.raises(ConfigError, match=r"'data\.local_size'"):
        load_config(None, ["data.local_size=-16"])


@pytest.mark.parametrize("key,value", [("model.num_register_tokens", "-1"), ("model.norm_eps", "0"),
                                       ("model.rope_base", "0"), ("model.pos_embed", "sincos"),
                                       ("model.ffn", "geglu"), ("model.init_format", "onnx")])
def test_bad_model_fields_are_named(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])
