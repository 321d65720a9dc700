"""`ibot export`: the timm format loads strictly into timm's ViT and reproduces our features; safetensors only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ibot_engine.checkpoint import Checkpointer
from ibot_engine.cli import main
from ibot_engine.config import config_to_dict, load_config
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.vit import VisionTransformer
from ibot_engine.tools.export import TIMM_NAMES, backbone_state, timm_kwargs, to_timm
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


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_timm_export_round_trip_matches_our_features(tmp_path, capsys, which):
    _, model = _checkpoint(tmp_path, "model.layerscale=0.1")
    out = tmp_path / "vit.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "timm", "--which", which, "--out", str(out)]) == 0
    assert "timm.create_model(\"vit_tiny_patch16_224\"" in capsys.readouterr().out
    raw = out.read_bytes()  # safetensors: u64 header length, then a JSON header; never a pickle / zip archive
    assert raw[8:9] == b"{" and not raw.startswith(b"PK")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["which"], meta["step"]) == ("timm", which, "7")
    kwargs = json.loads(meta["timm_kwargs"])
    assert kwargs == {"img_size": 32, "patch_size": 8, "num_classes": 0, "init_values": 0.1}

    # timm's own VisionTransformer class with the same hyper-parameters as our vit_tiny.
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    reference = TimmViT(embed_dim=192, depth=12, num_heads=3, **kwargs).eval()
    missing, unexpected = reference.load_state_dict(load_file(str(out)), strict=True)
    assert not missing and not unexpected
    ours = getattr(model, which).backbone.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reference.forward_features(images), ours(images), rtol=0, atol=1e-5)


def test_safetensors_export_loads_into_our_backbone(tmp_path):
    cfg, model = _checkpoint(tmp_path)
    out = tmp_path / "native.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "safetensors", "--out", str(out)]) == 0
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
        reference = timm.create_model(TIMM_NAMES[arch], pretrained=False, **timm_kwargs(cfg)).state_dict()
    assert TIMM_NAMES["vit_small"] == "vit_small_patch16_224"
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_bad_export_arguments(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint or a run directory" in capsys.readouterr().err
