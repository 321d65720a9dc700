"""`ibot visualize`: the cls token's self-attention per head in the last block (DINO's figure) and iBOT block masks.

The attention weights of the last block are computed explicitly by the backbone (`attention_maps`:
softmax(q k^T / sqrt(d)) from that block's own qkv projection, with RoPE and the zeroed K bias where the model has
them), since the model's forward goes through `scaled_dot_product_attention`, which never forms them. The cls row
is shown over the patch tokens only (register tokens, which start after cls, are left out). The PNG has two rows of
square tiles:

1. the input, the head-averaged cls attention over the patches, then one map per head;
2. the input, then block masks drawn by the run's masking generator (`mask.*`, ratios spread over
   [ratio_min, ratio_max]) with the masked patches darkened on the input.

Each map is normalised to its own [min, max] and upsampled (nearest) to the tile.

`--checkpoint` takes one of our checkpoints or released weights (features.py `read_model_source`; `--init-format`);
for released weights the input side defaults to the file's native size, and the masks use the default mask config.

Shapes: B images, H heads, T = 1 + R + N tokens (cls, R registers, N patches), h x w patch grid.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ibot_engine.config import Config, MaskConfig, load_config
from ibot_engine.data.masking import official_masks
from ibot_engine.eval.features import (
    eval_transform,
    read_model_source,
    released_backbone,
    released_model_config,
    teacher_backbone,
)
from ibot_engine.model.vit import VisionTransformer

PAD, LABEL = 8, 14
# "inferno"-like ramp: dark purple -> red -> yellow.
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colourise(map_hw: np.ndarray) -> np.ndarray:
    """[h, w] values -> [h, w, 3] uint8 on the ramp, after min-max normalisation."""
    lo, hi = float(map_hw.min()), float(map_hw.max())
    t = (map_hw - lo) / (hi - lo) if hi > lo else np.zeros_like(map_hw)
    pos = t * (len(_STOPS) - 1)
    i = np.clip(pos.astype(int), 0, len(_STOPS) - 2)
    frac = (pos - i)[..., None]
    return (_STOPS[i] * (1 - frac) + _STOPS[i + 1] * frac).round().astype(np.uint8)


def figure_size(num_heads: int, tile: int) -> tuple[int, int]:
    """(width, height) of the figure: 2 + num_heads tiles per row, 2 rows, each with a label line."""
    cols = 2 + num_heads
    return PAD + cols * (tile + PAD), PAD + 2 * (LABEL + tile + PAD)


def draw_figure(image: Image.Image, attention_Hhw: np.ndarray, masks_Mhw: np.ndarray, tile: int,
                ratios: list[float]) -> Image.Image:
    """The two-row figure (see the module docstring); `masks_Mhw` has num_heads + 1 masks."""
    H = attention_Hhw.shape[0]
    fig = Image.new("RGB", figure_size(H, tile), "white")
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default()
    shown = image.resize((tile, tile), Image.BICUBIC)

    def put(row: int, col: int, tile_image: Image.Image, label: str) -> None:
        x, y = PAD + col * (tile + PAD), PAD + row * (LABEL + tile + PAD)
        draw.text((x, y), label, fill="black", font=font)
        fig.paste(tile_image, (x, y + LABEL))

    def heat(map_hw: np.ndarray) -> Image.Image:
        return Image.fromarray(colourise(map_hw), "RGB").resize((tile, tile), Image.NEAREST)

    put(0, 0, shown, "input")
    put(0, 1, heat(attention_Hhw.mean(0)), "mean")
    for h in range(H):
        put(0, 2 + h, heat(attention_Hhw[h]), f"head {h}")
    put(1, 0, shown, "input")
    base = np.asarray(shown, np.float32)
    for m, mask_hw in enumerate(masks_Mhw):
        cover = np.asarray(Image.fromarray(mask_hw.astype(np.uint8) * 255).resize((tile, tile), Image.NEAREST)) > 0
        dimmed = np.where(cover[..., None], base * 0.25 + 40, base).clip(0, 255).astype(np.uint8)
        put(1, 1 + m, Image.fromarray(dimmed, "RGB"), f"mask {100 * mask_hw.mean():.0f}% (r={ratios[m]:.2f})")
    return fig


def example_masks(cfg: MaskConfig, grid: tuple[int, int], count: int, seed: int) -> tuple[np.ndarray, list[float]]:
    """`count` official-generator masks [count, h, w] with target ratios spread over [ratio_min, ratio_max]."""
    ratios = np.linspace(cfg.ratio_min, cfg.ratio_max, count).tolist()
    masks = [
        official_masks(dataclasses.replace(cfg, probability=1.0, ratio_min=r, ratio_max=r), grid, seed=seed,
                       epoch=0, indices=[i], num_views=1)[0]
        for i, r in enumerate(ratios)
    ]
    return np.stack(masks), ratios


def visualize(backbone: VisionTransformer, cfg: Config, image_path: str | Path, out: str | Path, *,
              size: int | None = None, tile: int = 224) -> Path:
    """Write the attention / mask figure of `image_path` to `out` (PNG); `size` is the model's input side."""
    size = size or cfg.data.global_size
    patch = backbone.patch_size
    if size % patch:
        raise ValueError(f"--size {size} is not a multiple of the patch size {patch}")
    try:
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"--image {str(image_path)!r}: cannot read it as an image: {err}") from err
    device = next(backbone.parameters()).device
    pixels = eval_transform(size)(image)[None].to(device)
    attention = backbone.eval().attention_maps(pixels.float())  # fp32: exact weights
    grid = (size // patch, size // patch)
    cls_HN = attention[0, :, 0, backbone.num_prefix_tokens :].float().cpu()
    masks, ratios = example_masks(cfg.mask, grid, backbone.blocks[-1].attn.num_heads + 1, cfg.train.seed)
    fig = draw_figure(image, cls_HN.reshape(-1, *grid).numpy(), masks, tile, ratios)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out, format="PNG")
    return out


def visualize_main(args: argparse.Namespace) -> Path:
    if not Path(args.image).is_file():
        raise ValueError(f"--image {args.image!r} does not exist or is not a file")
    source = read_model_source(args.checkpoint, getattr(args, "init_format", "auto"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if source.released is not None:
        cfg = load_config()
        cfg.model = released_model_config(source.released, cfg.model, args.size, "--size")
        cfg.data.global_size = cfg.model.img_size
        backbone = released_backbone(source.released, cfg.model, device, args.which)
    else:
        cfg = source.cfg
        backbone = teacher_backbone(cfg, source.state, device, args.which)
    out = Path(args.out) if args.out else source.path.parent / f"attention_{Path(args.image).stem}.png"
    out = visualize(backbone, cfg, args.image, out, size=args.size, tile=args.tile)
    print(out)
    return out
