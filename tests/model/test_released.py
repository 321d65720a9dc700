"""Released weights (ibot_engine.model.released): read in the official layouts, checked against timm's implementations
of DINO, DINOv2 (with and without registers) and DINOv3; fitted to another resolution as timm fits them; written back
in timm's, DINOv2's, DINOv3's and our own layouts; iBOT / DINO full checkpoints and backbone files; each bad input.

The official files are made here from timm models with random weights, by the inverse of timm's own checkpoint filter
(each test checks that the filter turns the file back into timm's tensors), so the reader is checked against a second
implementation and never against itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ibot_engine.config import ConfigError, LossConfig, ModelConfig
from ibot_engine.model.ibot import IBOT, IBOTNetwork
from ibot_engine.model.released import (
    fit_state,
    model_config_for,
    read_released,
    write_released,
)

timm = pytest.importorskip("timm")
from timm.models import eva as timm_eva  # noqa: E402
from timm.models import vision_transformer as timm_vit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOL = 1e-5  # fp32: two implementations that order a few reductions differently


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter N(0, 0.1), LayerNorm gains and LayerScale 1 + N(0, 0.1): timm's init leaves biases, tokens and
    gammas at 0, 1 or 1e-5, which would hide a missing or misplaced tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            one = ("norm" in name and name.endswith("weight")) or "gamma" in name
            p.normal_(1.0 if one else 0.0, 0.1, generator=gen)


def _timm_model(name: str, img_size: int | None = None, **kwargs) -> torch.nn.Module:
    """timm's model, its parameters left uninitialised (built on the meta device, then given CPU memory): every test
    sets all of them (`_randomise` or a strict load), and timm's truncated-normal init of a ViT-S costs about a second
    of CPU. Non-persistent buffers (the Eva RoPE periods, its zero K bias) are computed as timm's init does."""
    if img_size is not None:
        kwargs["img_size"] = img_size
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# The official layouts, from timm's keys (the inverse of timm's checkpoint filters)


def _dino_official(timm_state: dict) -> dict:
    return dict(timm_state)  # DINO's files are timm's keys (vit_small_patch16_224.dino loads them unchanged)


def _dinov2_official(timm_state: dict) -> dict:
    """DINOv2's hub layout: the mask token timm drops; for registers, `register_tokens` and a pos_embed with a cls slot
    (timm folds that position into its cls_token, so the official cls token is timm's minus the slot)."""
    out = dict(timm_state)
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = 0.1 * torch.randn(1, dim)
    if "reg_token" in out:
        cls_pos = 0.1 * torch.randn(1, 1, dim)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
    return out


def _dinov3_official(timm_state: dict) -> dict:
    """DINOv3's hub layout: storage tokens, ls1 / ls2 gammas, qkv.bias with a K third (random here: the bias_mask must
    zero it) and the mask, the RoPE periods, the mask token."""
    out = {}
    for key, value in timm_state.items():
        if key.endswith("attn.v_bias"):
            continue
        if key.endswith("attn.q_bias"):
            block = key.removesuffix("attn.q_bias")
            dim = value.shape[0]
            out[f"{block}attn.qkv.bias"] = torch.cat([value, torch.randn(dim), timm_state[f"{block}attn.v_bias"]])
            out[f"{block}attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[key] = value
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = 0.1 * torch.randn(1, dim)
    head_dim = 64
    out["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    return out


@dataclass
class Case:
    timm_name: str
    native: int
    other: int
    official: Callable[[dict], dict]
    timm_filter: Callable
    format: str
    fields: dict
    write_format: str = ""
    kwargs: dict = field(default_factory=dict)


_BASE = {"arch": "vit_small", "layerscale": 0.0, "num_register_tokens": 0, "pos_embed": "learned",
         "norm_eps": 1e-6, "ffn": "mlp", "qkv_k_bias": True}
CASES = {
    "dino_vits16": Case("vit_small_patch16_224", 224, 160, _dino_official, timm_vit.checkpoint_filter_fn, "dino",
                        {**_BASE, "patch_size": 16, "img_size": 224}),
    "dinov2_vits14": Case("vit_small_patch14_dinov2", 518, 224, _dinov2_official, timm_vit.checkpoint_filter_fn,
                          "dinov2", {**_BASE, "patch_size": 14, "img_size": 518, "layerscale": 1e-5}, "dinov2"),
    "dinov2_vits14_reg4": Case("vit_small_patch14_reg4_dinov2", 518, 224, _dinov2_official,
                               timm_vit.checkpoint_filter_fn, "dinov2",
                               {**_BASE, "patch_size": 14, "img_size": 518, "layerscale": 1e-5,
                                "num_register_tokens": 4}, "dinov2"),
    "dinov3_vits16": Case("vit_small_patch16_dinov3_qkvb", 224, 160, _dinov3_official, timm_eva.checkpoint_filter_fn,
                          "dinov3", {**_BASE, "patch_size": 16, "img_size": 224, "layerscale": 1e-5,
                                     "num_register_tokens": 4, "pos_embed": "rope", "rope_base": 100.0,
                                     "norm_eps": 1e-5, "qkv_k_bias": False}, "dinov3", {"global_pool": "token"}),
}


def _ours(released, img_size: int) -> tuple[torch.nn.Module, ModelConfig]:
    """Our backbone at `img_size` from the file's student backbone (teacher-style: no mask token). Built on the meta
    device and given the file's tensors (assign): no init to pay for, and every weight must come from the file."""
    cfg = model_config_for(released, ModelConfig(arch=released.model["arch"], patch_size=released.model["patch_size"],
                                                 img_size=img_size))
    with torch.device("meta"):
        backbone = IBOTNetwork(cfg, student=False).backbone
    state = fit_state({k.removeprefix("backbone."): v for k, v in released.student.items()
                       if k.startswith("backbone.") and k != "backbone.mask_token"}, cfg)
    backbone.load_state_dict(state, strict=True, assign=True)
    return backbone.eval(), cfg


def _max_difference(state: dict, reference: dict) -> float:
    assert state.keys() == reference.keys()
    return max(float((state[k].float() - v.float()).abs().max()) for k, v in reference.items())


def _assert_tokens(ours: torch.Tensor, reference: torch.Tensor, registers: int) -> None:
    """cls token and patch tokens (ours [cls, registers, patches], as timm's)."""
    torch.testing.assert_close(ours[:, 0], reference[:, 0], atol=TOL, rtol=0)
    torch.testing.assert_close(ours[:, 1 + registers:], reference[:, 1 + registers:], atol=TOL, rtol=0)


def _load_filtered(model: torch.nn.Module, timm_filter: Callable, official: dict) -> torch.nn.Module:
    model.load_state_dict(timm_filter(dict(official), model), strict=True)
    return model


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_official_layout_equals_timm_at_native_and_other_size_and_exports_back(name, tmp_path):
    case = CASES[name]
    reference = _timm_model(case.timm_name, **case.kwargs)
    _randomise(reference, seed=1)
    official = case.official(reference.state_dict())
    file = tmp_path / f"{name}_pretrain.pth"
    torch.save(official, file)
    # The file is the layout timm's own filter converts from: it turns back into the model's tensors.
    converted = case.timm_filter(torch.load(file, weights_only=True), reference)
    assert _max_difference(converted, reference.state_dict()) <= 1e-6  # cls_token - slot + slot: rounding only

    released = read_released(file)
    assert released.format == case.format
    assert {k: released.model[k] for k in case.fields} == case.fields
    assert released.teacher is None and not released.has_heads and released.cls_center is None
    assert "backbone.mask_token" in released.student or case.format == "dino"
    registers = case.fields["num_register_tokens"]

    ours, _ = _ours(released, case.native)
    images = torch.randn(1, 3, case.native, case.native)
    _assert_tokens(ours(images), reference.forward_features(images), registers)

    # Another resolution: timm's model created at that size from the same file, ours fitted once by fit_state.
    other = _load_filtered(_timm_model(case.timm_name, case.other, **case.kwargs), case.timm_filter, official)
    ours, cfg = _ours(released, case.other)
    images = torch.randn(1, 3, case.other, case.other)
    tokens = ours(images)
    _assert_tokens(tokens, other.forward_features(images), registers)

    # Our export in timm's layout loads into timm strictly and gives the same tokens.
    out = write_released(ours.state_dict(), cfg, tmp_path / "timm.safetensors", "timm", {"which": "teacher"})
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "timm" and meta["which"] == "teacher"
    back = _timm_model(meta["timm_name"], **json.loads(meta["timm_kwargs"]))
    back.load_state_dict(load_file(out), strict=True)
    _assert_tokens(tokens, back.forward_features(images), registers)
    again = read_released(out)
    assert again.format == "timm" and {k: again.model[k] for k in case.fields} == {**case.fields,
                                                                                    "img_size": case.other}

    if case.write_format:  # our writer of the official layout, read by timm's filter and by ours
        out = write_released(ours.state_dict(), cfg, tmp_path / f"{name}_export.pth", case.write_format)
        written = torch.load(out, weights_only=True)
        assert written.keys() == official.keys()
        _load_filtered(other, case.timm_filter, written)  # every tensor of `other` replaced
        _assert_tokens(tokens, other.forward_features(images), registers)
        again = read_released(out)
        assert again.format == case.write_format
        assert {k: again.model[k] for k in case.fields} == {**case.fields, "img_size": again.model["img_size"]}
        ours_again, _ = _ours(again, case.other)
        _assert_tokens(tokens, ours_again(images), registers)


@pytest.mark.parametrize(("timm_name", "size", "registers", "kwargs"), [
    ("vit_small_patch16_dinov3", 64, 4, {"global_pool": "token"}),  # no qkv bias at all (timm's non-_qkvb port)
    ("vit_small_plus_patch16_dinov3_qkvb", 64, 4, {"global_pool": "token"}),  # SwiGLU as fc1_g / fc1_x / fc2
    ("vit_small_patch14_reg4_dinov2", 56, 4, {"img_size": 56}),  # no_embed_class: the cls position in cls_token
    ("vit_small_patch14_dinov2", 56, 0, {"img_size": 56}),  # DINOv2 keys without the mask token
])
@torch.no_grad()
def test_timm_files_equal_timm(tmp_path, timm_name, size, registers, kwargs):
    """Files of timm's own models (what the Hub's timm/ repositories hold), as safetensors."""
    reference = _timm_model(timm_name, **kwargs)
    _randomise(reference, seed=6)
    file = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), file)
    released = read_released(file)
    assert released.format == "timm" and released.model["num_register_tokens"] == registers
    ours, _ = _ours(released, size)
    images = torch.randn(1, 3, size, size)
    _assert_tokens(ours(images), reference.forward_features(images), registers)
    # The Hub folder as the timm/ repositories hold it: config.json names the timm architecture.
    (tmp_path / "config.json").write_text(json.dumps({"architecture": timm_name, "num_classes": 0}))
    from_folder = read_released(tmp_path)
    assert from_folder.format == "timm" and from_folder.path == file
    assert from_folder.student.keys() == released.student.keys()


def test_fit_state_resamples_as_timm_and_keeps_the_cls_position():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    cfg = ModelConfig(arch="vit_small", patch_size=14, img_size=224)
    fitted = fit_state({"backbone.pos_embed": pos, "backbone.cls_token": torch.zeros(1, 1, 8)}, cfg)
    expected = timm.layers.resample_abs_pos_embed(pos, new_size=(16, 16), num_prefix_tokens=1)
    torch.testing.assert_close(fitted["backbone.pos_embed"], expected, atol=0, rtol=0)
    same = fit_state({"pos_embed": pos}, ModelConfig(arch="vit_small", patch_size=14, img_size=518))
    assert same["pos_embed"] is pos


# ----------------------------------------------------------------------------------------------------------------
# iBOT / DINO checkpoints (official layouts written from our own network's state)

_TINY = {"arch": "vit_tiny", "patch_size": 16, "img_size": 32, "out_dim": 64, "head_hidden_dim": 32,
         "head_bottleneck_dim": 16, "init": "xavier"}


def _tiny_ibot(**model) -> IBOT:
    ibot = IBOT(ModelConfig(**{**_TINY, **model}), LossConfig())
    _randomise(ibot, seed=2)
    with torch.no_grad():
        ibot.cls_center.normal_()
        ibot.patch_center.normal_()
    return ibot


def _official_backbone(state: dict, prefix: str) -> dict:
    renames = {"mask_token": "masked_embed", "patch_embed.weight": "patch_embed.proj.weight",
               "patch_embed.bias": "patch_embed.proj.bias"}
    return {f"{prefix}{renames.get(k, k)}": v for k, v in state.items()}


def _official_network(net: torch.nn.Module, prefix: str, *, separate_patch_head: bool = False) -> dict:
    """iBOT's MultiCropWrapper keys: backbone.* (masked_embed), head.* with last_layer2 = the patch head: an alias of
    last_layer (the same tensors, shared head) or a separate layer."""
    backbone = {k.removeprefix("backbone."): v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    out = _official_backbone(backbone, f"{prefix}backbone.")
    for key, value in net.state_dict().items():
        if key.startswith("head."):
            out[f"{prefix}{key}"] = value
            if key.startswith("head.last_layer."):
                second = key.replace("last_layer.", "last_layer2.")
                out[f"{prefix}{second}"] = torch.randn_like(value) if separate_patch_head else value
    return out


def _ibot_checkpoint(ibot: IBOT, *, student_separate: bool = False, teacher_separate: bool = False,
                     norm_last_layer: bool = False) -> dict:
    """The dict main_ibot.py saves: DDP student, plain teacher, the loss centres, optimizer state, epoch, args."""
    return {
        "student": _official_network(ibot.student, "module.", separate_patch_head=student_separate),
        "teacher": _official_network(ibot.teacher, "", separate_patch_head=teacher_separate),
        "ibot_loss": {"center": ibot.cls_center[None].clone(), "center2": ibot.patch_center[None, None].clone()},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 7, "fp16_scaler": None,
        "args": argparse.Namespace(arch="vit_tiny", out_dim=64, norm_last_layer=norm_last_layer, shared_head=True,
                                   global_crops_scale=(0.25, 1.0), data_path="/data/train"),
    }


def test_ibot_full_checkpoint_continues_with_every_tensor_equal(tmp_path, caplog):
    ibot = _tiny_ibot()
    with torch.no_grad():  # the teacher differs from the student, as in any checkpoint after step 0
        for p in ibot.teacher.parameters():
            p.add_(0.01)
    file = tmp_path / "checkpoint.pth"
    torch.save(_ibot_checkpoint(ibot), file)
    with caplog.at_level(logging.WARNING):
        released = read_released(file)
    assert not caplog.records  # the shared-head alias last_layer2 is dropped silently
    assert released.format == "ibot" and released.has_heads
    assert {k: released.model[k] for k in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers",
                                            "norm_last_layer", "arch", "img_size")} == {
        "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "head_layers": 3, "norm_last_layer": False,
        "arch": "vit_tiny", "img_size": 32}

    cfg = model_config_for(released, ModelConfig(arch="vit_tiny", patch_size=16, img_size=32, out_dim=8192))
    fresh = IBOT(cfg, LossConfig())  # what training builds, then fills from the file
    fresh.student.load_state_dict(fit_state(released.student, cfg), strict=True)
    fresh.teacher.load_state_dict(fit_state(released.teacher, cfg), strict=True)
    fresh.cls_center.copy_(released.cls_center)
    fresh.patch_center.copy_(released.patch_center)
    expected = ibot.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(("student_separate", "teacher_separate"), [(True, False), (True, True)])
def test_a_separate_patch_head_is_dropped_with_one_warning(tmp_path, caplog, student_separate, teacher_separate):
    ibot = _tiny_ibot()
    file = tmp_path / "checkpoint.pth"
    torch.save(_ibot_checkpoint(ibot, student_separate=student_separate, teacher_separate=teacher_separate), file)
    with caplog.at_level(logging.WARNING):
        released = read_released(file)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(file) in message and "head.last_layer2.weight_g" in message and "head.last_layer2.weight_v" in message
    assert not any("last_layer2" in k for k in [*released.student, *released.teacher])
    torch.testing.assert_close(released.cls_center, ibot.cls_center, atol=0, rtol=0)
    if teacher_separate:  # the patch centre was the separate teacher patch head's: it starts fresh
        assert released.patch_center is None and "center2" in message
    else:
        torch.testing.assert_close(released.patch_center, ibot.patch_center, atol=0, rtol=0)


@pytest.mark.parametrize("with_head", [False, True])
def test_ibot_backbone_only_file(tmp_path, with_head):
    """extract_backbone_weights.py: {'state_dict': the teacher backbone, no prefixes (and head.* with --with_head)}."""
    ibot = _tiny_ibot()
    teacher = _official_network(ibot.teacher, "")
    state = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
    if with_head:
        state.update({k: v for k, v in teacher.items() if k.startswith("head.")})
    file = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": state}, file)
    released = read_released(file)
    assert released.format == "ibot" and released.teacher is None and released.has_heads == with_head
    for key, value in ibot.teacher.state_dict().items():
        if key.startswith("backbone.") or with_head:
            assert torch.equal(released.student[key], value), key
    assert "backbone.mask_token" not in released.student


def test_dino_full_checkpoint_gives_its_head_and_cls_centre(tmp_path):
    ibot = _tiny_ibot(norm_last_layer=True)
    with torch.no_grad():
        for net in (ibot.student, ibot.teacher):
            net.head.last_layer.weight_g.fill_(1.0)  # frozen gains (DINO's norm_last_layer default)
    student = {k: v for k, v in _official_network(ibot.student, "module.").items()
               if "last_layer2" not in k and "masked_embed" not in k}
    teacher = {k: v for k, v in _official_network(ibot.teacher, "").items() if "last_layer2" not in k}
    file = tmp_path / "dino_full_checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "dino_loss": {"center": ibot.cls_center[None].clone()},
                "epoch": 3}, file)
    released = read_released(file)
    assert released.format == "dino" and released.has_heads and released.model["norm_last_layer"] is True
    assert released.patch_center is None
    torch.testing.assert_close(released.cls_center, ibot.cls_center, atol=0, rtol=0)
    for key, value in ibot.teacher.state_dict().items():
        assert torch.equal(released.teacher[key], value), key
    assert "backbone.mask_token" not in released.student  # DINO has none: it starts at zero


# ----------------------------------------------------------------------------------------------------------------
# Our own exports


def _backbone_state(net: torch.nn.Module) -> dict:
    return {k.removeprefix("backbone."): v for k, v in net.state_dict().items() if k.startswith("backbone.")}


def test_ibot_engine_format_round_trips_every_structural_field(tmp_path):
    cfg = ModelConfig(arch="vit_small_plus", patch_size=16, img_size=64, layerscale=0.1, num_register_tokens=2,
                      pos_embed="rope", rope_base=50.0, norm_eps=1e-5, ffn="swiglu", qkv_k_bias=False, init="xavier")
    net = IBOTNetwork(cfg, student=True)
    _randomise(net, seed=3)
    state = _backbone_state(net)
    out = write_released(state, cfg, tmp_path / "ours.safetensors", "ibot-engine", {"which": "student", "step": "9"})
    released = read_released(out)
    assert released.format == "ibot-engine"
    assert released.model == {k: getattr(cfg, k) for k in released.model}
    assert set(released.model) >= {"arch", "patch_size", "img_size", "layerscale", "num_register_tokens", "pos_embed",
                                   "rope_base", "norm_eps", "ffn", "qkv_k_bias"}
    for key, value in state.items():
        assert torch.equal(released.student[f"backbone.{key}"], value), key


@pytest.mark.parametrize("old_format", ["safetensors", "timm"])
def test_files_of_the_previous_export_read(tmp_path, old_format):
    """The `safetensors` (our keys) and `timm` files `ibot export` wrote before this loader existed."""
    cfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, layerscale=0.1, init="xavier")
    net = IBOTNetwork(cfg, student=False)
    _randomise(net, seed=4)
    state = _backbone_state(net)
    metadata = {"format": old_format, "which": "teacher", "arch": "vit_tiny", "patch_size": "8", "img_size": "32",
                "layerscale": "0.1", "step": "7"}
    tensors = dict(state)
    if old_format == "timm":
        tensors = {k.replace("patch_embed.", "patch_embed.proj."): v for k, v in state.items()}
        metadata.update(timm_name="vit_tiny_patch16_224",
                        timm_kwargs=json.dumps({"img_size": 32, "patch_size": 8, "init_values": 0.1}))
    file = tmp_path / f"old_{old_format}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata=metadata)
    released = read_released(file)
    assert released.format == ("timm" if old_format == "timm" else "ibot-engine")
    assert {k: released.model[k] for k in ("arch", "patch_size", "img_size", "layerscale")} == {
        "arch": "vit_tiny", "patch_size": 8, "img_size": 32, "layerscale": 0.1}
    for key, value in state.items():
        assert torch.equal(released.student[f"backbone.{key}"], value), key


def test_hf_folder_is_read_and_written_through_hf_format(tmp_path):
    cfg = ModelConfig(arch="vit_tiny", patch_size=16, img_size=32, layerscale=0.1, num_register_tokens=4,
                      init="xavier")
    net = IBOTNetwork(cfg, student=True)
    _randomise(net, seed=5)
    state = _backbone_state(net)
    folder = write_released(state, cfg, tmp_path / "hf", "hf")
    released = read_released(folder)
    assert released.format == "hf" and released.model["num_register_tokens"] == 4
    for key, value in state.items():
        assert torch.equal(released.student[f"backbone.{key}"], value), key
    assert read_released(folder / "model.safetensors").path == folder  # its weights file: read as the folder


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear error, naming the file and the keys


def _tiny_dino_file(tmp_path) -> str:
    vit = _timm_model("vit_tiny_patch16_224", 32)
    file = tmp_path / "dino_vit_tiny.pth"
    torch.save(vit.state_dict(), file)
    return str(file)


def test_another_architecture_is_named(tmp_path):
    resnet = tmp_path / "resnet18.pth"
    torch.save(_timm_model("resnet18").state_dict(), resnet)
    with pytest.raises(ValueError, match=r"resnet18\.pth: not a ViT backbone.*conv1\.weight"):
        read_released(resnet)
    odd = tmp_path / "vit_256x4.pth"
    vit = timm_vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=256, depth=4, num_heads=4, num_classes=0)
    torch.save(vit.state_dict(), odd)
    with pytest.raises(ValueError, match=r"vit_256x4\.pth: a ViT 256 wide \(cls_token \[1, 1, 256\]\) with 4 blocks"):
        read_released(odd)


def test_config_arch_and_patch_size_must_be_the_files(tmp_path):
    released = read_released(_tiny_dino_file(tmp_path))
    with pytest.raises(ConfigError, match=r"'model.arch' = vit_small but .*dino_vit_tiny\.pth holds a vit_tiny"):
        model_config_for(released, ModelConfig(arch="vit_small", patch_size=16))
    with pytest.raises(ConfigError, match=r"'model.patch_size' = 14 but .*dino_vit_tiny\.pth has patch size 16"):
        model_config_for(released, ModelConfig(arch="vit_tiny", patch_size=14))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_file_is_named(tmp_path, suffix):
    state = _timm_model("vit_tiny_patch16_224", 32).state_dict()
    file = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, file)
    else:
        save_file(state, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"weights\{suffix}: not a readable .*truncated or damaged"):
        read_released(file)


_UNPICKLED: list[str] = []


class _Payload:
    """Records that it was unpickled: a plain torch.load would run this, ours must refuse the file."""

    def __setstate__(self, state):
        _UNPICKLED.append("ran")


def test_a_pickle_with_more_than_tensors_is_refused_without_running_it(tmp_path):
    file = tmp_path / "with_objects.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 192), "payload": _Payload()}, file)
    with pytest.raises(ValueError, match=r"with_objects\.pth: holds objects other than tensors .*_Payload"):
        read_released(file)
    assert not _UNPICKLED


def test_a_format_that_does_not_fit_and_a_missing_file_are_named(tmp_path):
    file = _tiny_dino_file(tmp_path)
    with pytest.raises(ValueError, match=r"dino_vit_tiny\.pth: model.init_format=dinov3 does not fit"):
        read_released(file, "dinov3")
    assert read_released(file, "timm").format == "timm"  # DINO's layout is timm's: either name is right
    with pytest.raises(ValueError, match=r"nowhere\.pth: no such file"):
        read_released(tmp_path / "nowhere.pth")


def test_dinov3_periods_and_bias_masks_are_checked(tmp_path):
    cfg = ModelConfig(arch="vit_tiny", patch_size=16, img_size=32, layerscale=0.1, num_register_tokens=4,
                      pos_embed="rope", norm_eps=1e-5, qkv_k_bias=False, init="xavier")
    net = IBOTNetwork(cfg, student=True)
    out = write_released(_backbone_state(net), cfg, tmp_path / "dinov3_tiny.pth", "dinov3")
    state = torch.load(out, weights_only=True)
    torch.save({**state, "rope_embed.periods": 10000.0 ** (torch.arange(16) / 16)}, out)
    with pytest.raises(ValueError, match=r"dinov3_tiny\.pth: rope_embed.periods"):
        read_released(out)
    torch.save({**state, "blocks.3.attn.qkv.bias_mask": torch.full((576,), math.nan)}, out)
    with pytest.raises(ValueError, match=r"dinov3_tiny\.pth: blocks.3.attn.qkv.bias_mask"):
        read_released(out)


# ----------------------------------------------------------------------------------------------------------------
# Speed and memory of a ViT-B file


_MEASURE = textwrap.dedent("""
    import sys, time
    import torch
    from ibot_engine.config import ModelConfig
    from ibot_engine.eval.features import released_backbone, released_model_config
    from ibot_engine.model.released import read_released

    def hwm_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    before = hwm_mib()
    start = time.perf_counter()
    released = read_released(sys.argv[1])  # the file to a ready backbone, as `ibot eval` loads it
    backbone = released_backbone(released, released_model_config(released, ModelConfig()))
    total = sum(float(p.float().sum()) for p in backbone.parameters())  # every byte read from the file
    seconds = time.perf_counter() - start
    print(seconds, hwm_mib() - before)
""")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vit_b_file_loads_fast_and_within_twice_its_size(tmp_path, suffix):
    vit_b = _timm_model("vit_base_patch14_dinov2")
    _randomise(vit_b, seed=7)
    state = {k: v.contiguous() for k, v in _dinov2_official(vit_b.state_dict()).items()}
    file = tmp_path / f"dinov2_vitb14{suffix}"
    torch.save(state, file) if suffix == ".pth" else save_file(state, file)
    size_mib = os.path.getsize(file) / 2**20
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(file)], capture_output=True, text=True, check=True)
    seconds, peak_mib = map(float, run.stdout.split())
    print(f"{suffix}: {seconds:.2f} s, peak +{peak_mib:.0f} MiB for a {size_mib:.0f} MiB file")
    assert seconds < 2.0, seconds
    assert peak_mib < 2 * size_mib, (peak_mib, size_mib)
