"""`ibot export`: every format reads back into the same model; the timm format loads strictly into timm and
reproduces our features; released files export too; safetensors only where the format is safetensors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ibot_engine import cli
from ibot_engine.checkpoint import Checkpointer
from ibot_engine.cli import main
from ibot_engine.config import ModelConfig, config_to_dict, load_config
from ibot_engine.eval.features import released_backbone, released_model_config
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.released import (
    FORMATS,
    TIMM_VITS,
    WRITE_FORMATS,
    read_released,
    timm_name,
    timm_spec,
    to_timm,
    write_released,
)
from ibot_engine.model.vit import ARCHS, VisionTransformer
from ibot_engine.tools.export import ALIASES, backbone_state
from tests.helpers import tiny_config

timm = pytest.importorskip("timm")


def _checkpoint(run_dir, *extra: str):
    """A real checkpoint file of a fresh tiny model whose student differs from its teacher."""
    cfg = tiny_config(f"run.dir={run_dir}", *extra)
    torch.manual_seed(0)
    model = IBOT(cfg.model, cfg.loss)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    Checkpointer(run_dir).save(7, {"step": 7, "model": model.state_dict(), "config": config_to_dict(cfg)})
    return cfg, model


# xavier: the round trip does not depend on the init, and truncated normals for a ViT-S take seconds on the CPU.
_SMALL16_224 = ("model.arch=vit_small", "model.patch_size=16", "model.img_size=224", "data.global_size=224",
                "data.local_size=96", "model.init=xavier")


# The acceptance check: ViT-tiny/8 at 32 px (timm has no tiny patch-8 model, so the name's patch size and
# image size are overridden by timm_kwargs; LayerScale on, so init_values too) and ViT-small/16 at 224 px (timm's
# own entry, no LayerScale). Both backbones of the tiny one.
@pytest.mark.parametrize(("overrides", "which", "name", "kwargs"), [
    (("model.layerscale=0.1",), "teacher", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8,
                                                                     "init_values": 0.1}),
    (("model.layerscale=0.1",), "student", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8,
                                                                     "init_values": 0.1}),
    (_SMALL16_224, "teacher", "vit_small_patch16_224", {"img_size": 224, "patch_size": 16}),
], ids=["tiny8-32-teacher", "tiny8-32-student", "small16-224-teacher"])
def test_timm_export_round_trip_matches_our_features(tmp_path, capsys, overrides, which, name, kwargs):
    cfg, model = _checkpoint(tmp_path, *overrides)
    out = tmp_path / "vit.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "timm", "--which", which, "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    raw = out.read_bytes()  # safetensors: u64 header length, then a JSON header; never a pickle / zip archive
    assert raw[8:9] == b"{" and not raw.startswith(b"PK")
    assert (meta["format"], meta["which"], meta["step"]) == ("timm", which, "7")
    assert (meta["timm_name"], json.loads(meta["timm_kwargs"])) == (name, kwargs)
    # The printed hint is the call the metadata describes.
    call = f'timm.create_model("{name}", pretrained=False, num_classes=0'
    call += "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"
    assert call in capsys.readouterr().out

    # Exactly the acceptance check's call, with nothing but the file's metadata.
    reference = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    reference.load_state_dict(load_file(str(out)), strict=True)
    reference.eval()
    ours = getattr(model, which).backbone.eval()
    size = cfg.model.img_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reference.forward_features(images), ours(images), rtol=0, atol=1e-5)


def test_safetensors_export_loads_into_our_backbone(tmp_path):
    cfg, model = _checkpoint(tmp_path)
    out = tmp_path / "native.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    # `safetensors` is the old name of `ibot-engine`; the file says which layout it holds.
    assert meta["format"] == "ibot-engine" and "timm_name" not in meta  # timm cannot load our key names
    backbone = VisionTransformer(cfg.model.arch, patch_size=8, img_size=32)
    backbone.load_state_dict(load_file(str(out)), strict=True)
    for k, v in model.teacher.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k


def test_default_export_path_is_next_to_the_checkpoint(tmp_path):
    _checkpoint(tmp_path)
    assert main(["export", "--checkpoint", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoints" / "step_00000007_teacher_backbone_timm.safetensors").is_file()


@pytest.mark.parametrize("arch", ["vit_small", "vit_base", "vit_large"])
def test_timm_keys_and_shapes_match_the_named_timm_models(arch):
    cfg = load_config(None, [f"model.arch={arch}"])
    with torch.device("meta"):  # shapes only: no memory for ViT-L's weights
        ours = to_timm(backbone_state({f"teacher.backbone.{k}": v for k, v in
                                       VisionTransformer(arch).state_dict().items()}))
        name, kwargs = timm_spec(cfg.model)
        reference = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).state_dict()
    assert timm_name("vit_small", 16, 224) == "vit_small_patch16_224"
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_every_table_entry_is_the_timm_vit_it_claims():
    """Each name is registered and builds our arch's width, depth and heads at the table's patch and image size."""
    for arch, entries in TIMM_VITS.items():
        for (patch, size), name in entries.items():
            assert timm.is_model(name), name
            with torch.device("meta"):
                vit = timm.create_model(name, pretrained=False, num_classes=0)
            a = ARCHS[arch]
            assert (vit.patch_embed.patch_size, vit.patch_embed.img_size) == ((patch, patch), (size, size)), name
            assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (a.embed_dim, a.depth,
                                                                                      a.num_heads), name
    assert set(TIMM_VITS) == set(ARCHS)


def test_the_table_has_every_plain_timm_vit_of_our_archs():
    """timm's `<arch>_patch<P>_<S>` entries (no clip / dinov2 / rope / ... suffix) are all in the table, so an exact
    match is never missed."""
    for arch, entries in TIMM_VITS.items():
        plain = {m for m in timm.list_models(f"{arch}_patch*") if re.fullmatch(rf"{arch}_patch\d+_\d+", m)}
        assert plain == set(entries.values()), arch


@pytest.mark.parametrize(("arch", "patch", "size", "name"), [
    ("vit_small", 8, 224, "vit_small_patch8_224"),  # exact entries
    ("vit_base", 16, 384, "vit_base_patch16_384"),
    ("vit_large", 14, 224, "vit_large_patch14_224"),
    ("vit_tiny", 8, 32, "vit_tiny_patch16_224"),  # no tiny patch 8: closest patch, then closest size
    ("vit_tiny", 16, 512, "vit_tiny_patch16_384"),
    ("vit_small", 8, 96, "vit_small_patch8_224"),
    ("vit_large", 14, 384, "vit_large_patch14_224"),  # patch first: not vit_large_patch16_384
    ("vit_base", 12, 224, "vit_base_patch8_224"),  # equally far from 8 and 16: the smaller
    ("vit_large", 8, 224, "vit_large_patch14_224"),
])
def test_timm_name_picks_the_exact_or_closest_entry(arch, patch, size, name):
    assert timm_name(arch, patch, size) == name


def test_timm_name_rejects_an_unknown_arch():
    with pytest.raises(ValueError, match=r"model.arch 'vit_huge'.*vit_base"):
        timm_name("vit_huge", 14, 224)


def test_bad_export_arguments(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint or a run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Every format reads back into the same model, registers and RoPE included

# A model continued from DINOv3 (RoPE, 4 storage tokens, eps 1e-5, K bias masked, LayerScale), one continued from
# DINOv2 with registers, and a plain iBOT one (no LayerScale, no registers).
_DINOV3_LIKE = ("model.num_register_tokens=4", "model.pos_embed=rope", "model.norm_eps=1e-5", "model.qkv_k_bias=false",
                "model.layerscale=0.1")
_DINOV2_REG_LIKE = ("model.num_register_tokens=4", "model.layerscale=0.1")
_ROUND_TRIPS = [
    *[pytest.param(_DINOV3_LIKE, fmt, id=f"dinov3like-{fmt}") for fmt in ("ibot-engine", "timm", "dinov3", "hf")],
    *[pytest.param(_DINOV2_REG_LIKE, fmt, id=f"dinov2reg-{fmt}") for fmt in ("ibot-engine", "timm", "dinov2", "hf")],
    *[pytest.param((), fmt, id=f"plain-{fmt}") for fmt in ("ibot-engine", "timm", "dinov2", "hf")],
]


def _perturbed_checkpoint(run_dir, *extra: str):
    """A checkpoint whose every tensor is drawn away from its init (nonzero biases, K bias included; LayerScale
    gammas not at their init), student and teacher different."""
    cfg = tiny_config(f"run.dir={run_dir}", *extra)
    torch.manual_seed(0)
    model = IBOT(cfg.model, cfg.loss)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    Checkpointer(run_dir).save(3, {"step": 3, "model": model.state_dict(), "config": config_to_dict(cfg)})
    return cfg, model


@pytest.mark.parametrize(("overrides", "fmt"), _ROUND_TRIPS)
def test_export_reads_back_into_the_same_model(tmp_path, overrides, fmt):
    cfg, model = _perturbed_checkpoint(tmp_path / "run", *overrides)
    out = tmp_path / f"exported_{fmt}"
    which = "student" if fmt in ("timm", "hf") else "teacher"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", fmt, "--which", which,
                 "--out", str(out)]) == 0
    released = read_released(out)
    assert released.format == fmt and released.teacher is None
    for field in ("arch", "patch_size", "num_register_tokens", "pos_embed", "ffn", "qkv_k_bias"):
        assert released.model[field] == getattr(cfg.model, field), field
    assert released.model["norm_eps"] == pytest.approx(cfg.model.norm_eps)
    backbone = released_backbone(released, released_model_config(released, ModelConfig(), 32))
    ours = getattr(model, which).backbone.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), ours(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides", [_DINOV3_LIKE, _DINOV2_REG_LIKE], ids=["dinov3like", "dinov2reg"])
def test_timm_export_of_registers_and_rope_loads_into_timm(tmp_path, overrides):
    """The acceptance check for the models with registers / RoPE: timm's own class from the metadata alone."""
    _, model = _perturbed_checkpoint(tmp_path, *overrides)
    out = tmp_path / "vit.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "timm", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    reference = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    reference.load_state_dict(load_file(str(out)), strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reference.eval().forward_features(images), model.teacher.backbone.eval()(images),
                                   rtol=0, atol=1e-5)


def test_safetensors_is_an_alias_of_ibot_engine(tmp_path):
    _checkpoint(tmp_path)
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "safetensors", "--out", str(old)]) == 0
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "ibot-engine", "--out", str(new)]) == 0
    # Same tensors, same metadata (the header's metadata order is not fixed: safetensors keeps it in a hash map).
    old_tensors, new_tensors = load_file(str(old)), load_file(str(new))
    assert old_tensors.keys() == new_tensors.keys()
    assert all(torch.equal(old_tensors[k], new_tensors[k]) for k in old_tensors)
    with safe_open(str(old), "pt") as f_old, safe_open(str(new), "pt") as f_new:
        assert f_old.metadata() == f_new.metadata()
        assert f_new.metadata()["format"] == "ibot-engine"
    assert ALIASES == {"safetensors": "ibot-engine"}


def test_command_line_format_lists_are_the_loaders(tmp_path):
    """cli.py spells the formats out (`ibot --help` imports no torch): they must be the ones the loaders read and
    write."""
    assert [*WRITE_FORMATS, *ALIASES] == cli.EXPORT_FORMATS
    assert ["auto", *FORMATS] == cli.INIT_FORMATS


# ----------------------------------------------------------------------------------------------------------------
# Released files as input


def _released_file(path, fmt: str = "dinov2", **fields):
    """A random vit_tiny/8 at 32 px written by the loaders' writer in a released layout; (model config, backbone)."""
    model_cfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, layerscale=1e-5, **fields)
    torch.manual_seed(5)
    vit = IBOT(model_cfg, load_config().loss).teacher.backbone
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_released(vit.state_dict(), model_cfg, path, fmt)
    return model_cfg, vit.eval()


def test_export_converts_a_released_file_to_timm(tmp_path, capsys):
    source = tmp_path / "dinov2_vitt8_reg4_pretrain.pth"
    _, vit = _released_file(source, num_register_tokens=4)
    assert main(["export", "--checkpoint", str(source), "--format", "timm"]) == 0
    out = tmp_path / "dinov2_vitt8_reg4_pretrain_timm.safetensors"  # next to the file by default
    assert str(out) in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["which"], meta["source_format"], meta["step"]) == ("backbone", "dinov2", "")
    reference = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    reference.load_state_dict(load_file(str(out)), strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reference.eval().forward_features(images), vit(images), rtol=0, atol=1e-5)


def test_export_of_a_file_that_is_neither_ours_nor_released(tmp_path, capsys):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    assert main(["export", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert main(["export", "--checkpoint", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nor a Hugging Face folder" in err and str(empty) in err
    assert main(["export", "--checkpoint", str(tmp_path), "--init-format", "dinov3"]) == 2  # a format: released only
    assert str(tmp_path) in capsys.readouterr().err
