"""`ibot visualize`: explicit last-block attention equals the SDPA block's (registers and RoPE too), and the figure is
a PNG of the stated size, from our checkpoints and from released files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_engine.checkpoint import Checkpointer
from ibot_engine.cli import main
from ibot_engine.config import ModelConfig, config_to_dict, load_config
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.released import write_released
from ibot_engine.model.vit import VisionTransformer
from ibot_engine.tools.visualize import example_masks
from tests.helpers import tiny_config


@pytest.mark.parametrize("structure", [{}, {"num_register_tokens": 4, "pos_embed": "rope", "qkv_k_bias": False}],
                         ids=["plain", "registers-rope-kmask"])
def test_explicit_attention_reproduces_the_sdpa_block(structure):
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, **structure).eval()
    with torch.no_grad():
        for p in vit.parameters():  # nonzero biases: the K bias, when masked, must not count
            p.add_(0.02 * torch.randn_like(p))
    images = torch.randn(2, 3, 32, 32)
    T = vit.num_prefix_tokens + 16
    attn_BHTT = vit.attention_maps(images)
    assert attn_BHTT.shape == (2, 3, T, T)
    torch.testing.assert_close(attn_BHTT.sum(-1), torch.ones(2, 3, T))
    # attn @ v through the block's projection == the block's own (SDPA) attention output.
    with torch.no_grad():
        x = vit.prepare_tokens(images)
        rope = vit.rope_tables([(1, 4, 4)], x.device)
        for block in vit.blocks[:-1]:
            x = block(x, rope=rope)
        last = vit.blocks[-1]
        y = last.norm1(x)
        v = last.attn.qkv(y).reshape(2, T, 3, 3, 64).permute(2, 0, 3, 1, 4)[2]  # V's bias is never masked
        explicit = last.attn.proj((attn_BHTT @ v).transpose(1, 2).reshape(2, T, 192))
        torch.testing.assert_close(explicit, last.attn(y, rope=rope), rtol=0, atol=1e-5)


def test_example_masks_follow_the_ratios():
    cfg = load_config(None, ["mask.ratio_min=0.1", "mask.ratio_max=0.5", "mask.min_block_patches=4"])
    masks, ratios = example_masks(cfg.mask, (14, 14), 4, seed=0)
    assert masks.shape == (4, 14, 14) and masks.dtype == bool
    assert np.allclose(ratios, [0.1, 0.1 + 0.4 / 3, 0.1 + 0.8 / 3, 0.5])
    fractions = masks.reshape(4, -1).mean(1)
    assert all(f > 0 for f in fractions) and fractions[-1] > fractions[0]


def test_visualize_writes_a_png_of_the_right_size(tmp_path, capsys):
    cfg = tiny_config(f"run.dir={tmp_path}")
    Checkpointer(tmp_path).save(1, {"step": 1, "model": IBOT(cfg.model, cfg.loss).state_dict(),
                                    "config": config_to_dict(cfg)})
    image = tmp_path / "in.jpg"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(image)
    out = tmp_path / "attn.png"
    assert main(["visualize", "--checkpoint", str(tmp_path), "--image", str(image), "--tile", "64",
                 "--out", str(out)]) == 0
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        # vit_tiny has 3 heads: 5 tiles of 64 px (+ 8 px gaps) a row, 2 rows of 14 px label + 64 px tile.
        assert (png.format, png.size, png.mode) == ("PNG", (8 + 5 * 72, 8 + 2 * 86), "RGB")
    assert main(["visualize", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "nope.png")]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["visualize", "--checkpoint", str(tmp_path), "--image", str(image), "--size", "30"]) == 2


def test_visualize_a_released_file(tmp_path, capsys):
    """A DINOv3-layout file (RoPE, 4 storage tokens): the figure maps the 16 patches, not the registers, at --size."""
    model_cfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, layerscale=1e-5, num_register_tokens=4,
                            pos_embed="rope", norm_eps=1e-5, qkv_k_bias=False)
    torch.manual_seed(0)
    released = tmp_path / "dinov3_vitt8.pth"
    write_released(IBOT(model_cfg, load_config().loss).teacher.backbone.state_dict(), model_cfg, released, "dinov3")
    image = tmp_path / "in.png"
    Image.new("RGB", (40, 40), (20, 160, 30)).save(image)
    assert main(["visualize", "--checkpoint", str(released), "--image", str(image), "--size", "32", "--tile",
                 "48"]) == 0
    out = tmp_path / "attention_in.png"  # next to the file by default
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as png:
        assert (png.format, png.size) == ("PNG", (8 + 5 * 56, 8 + 2 * 70))
    assert main(["visualize", "--checkpoint", str(released), "--image", str(image), "--size", "36"]) == 2
    err = capsys.readouterr().err
    assert "--size 36" in err and str(released) in err
