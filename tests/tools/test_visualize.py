"""`ibot visualize`: explicit last-block attention equals the SDPA block's, and the figure is a PNG of the stated
size."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ibot_engine.checkpoint import Checkpointer
from ibot_engine.cli import main
from ibot_engine.config import config_to_dict, load_config
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.vit import VisionTransformer
from ibot_engine.tools.visualize import example_masks, last_block_attention
from tests.helpers import tiny_config


def test_explicit_attention_reproduces_the_sdpa_block():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    attn_BHTT = last_block_attention(vit, images)
    assert attn_BHTT.shape == (2, 3, 17, 17)
    torch.testing.assert_close(attn_BHTT.sum(-1), torch.ones(2, 3, 17))
    # attn @ v through the block's projection == the block's own (SDPA) attention output.
    with torch.no_grad():
        x = vit.prepare_tokens(images)
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        y = last.norm1(x)
        v = last.attn.qkv(y).reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)[2]
        explicit = last.attn.proj((attn_BHTT @ v).transpose(1, 2).reshape(2, 17, 192))
        torch.testing.assert_close(explicit, last.attn(y), rtol=0, atol=1e-5)


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
