"""`ibot export`: the timm format loads strictly into timm's ViT and reproduces our features; safetensors only."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ibot_engine.checkpoint import Checkpointer
from ibot_engine.cli import main
from ibot_engine.config import config_to_dict, load_config
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.vit import ARCHS, VisionTransformer
from ibot_engine.tools.export import TIMM_VITS, backbone_state, timm_kwargs, timm_name, to_timm
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
    assert meta["format"] == "safetensors" and "timm_name" not in meta  # timm cannot load our key names
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
        reference = timm.create_model(timm_name(arch, 16, 224), pretrained=False, num_classes=0,
                                      **timm_kwargs(cfg)).state_dict()
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
