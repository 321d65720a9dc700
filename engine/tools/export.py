"""`ibot export`: the backbone of a checkpoint as a safetensors state dict (never a pickle).

Two formats, both the teacher's backbone by default (`--which student` for the student's; the student-only mask
token is left out):

* `safetensors`: our own `VisionTransformer` key names; `VisionTransformer(arch, patch_size, img_size,
  layerscale=...).load_state_dict(...)` takes it as is.
* `timm`: timm's ViT key names (`patch_embed.proj.*`; everything else already matches). The file's metadata holds
  `timm_name` (`timm_name(arch, patch_size, img_size)`) and `timm_kwargs` (JSON: img_size, patch_size, and
  init_values when LayerScale is on), and
  `timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))`
  loads the file with `strict=True`; its `forward_features` then returns our backbone's tokens (same LayerNorm
  eps 1e-6, exact GELU, qkv bias).

Every file's metadata also records the format, architecture, patch and image size, LayerScale, which backbone and
the step. Files are written atomically.

Checkpoints are read only through `ibot_engine.checkpoint.read_checkpoint` (this command, `ibot eval` and
`ibot visualize` all use it), so a change of checkpoint format changes one function.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import Tensor

from ibot_engine.checkpoint import atomic_write, read_checkpoint
from ibot_engine.config import Config

FORMATS = ("timm", "safetensors")
# The plain ViTs timm 1.0.31 registers for each of our archs, by (patch size, image size): the only table from our
# arch names to timm's. Data rather than a `timm.list_models` query, since the engine does not depend on timm;
# tests/tools/test_export.py checks it against the installed timm. CLIP / DINOv2 / DINOv3 / SigLIP / RoPE /
# register / parallel-block variants are left out: their blocks or tokens differ from our ViT's.
TIMM_VITS: dict[str, dict[tuple[int, int], str]] = {
    "vit_tiny": {(16, 224): "vit_tiny_patch16_224", (16, 384): "vit_tiny_patch16_384"},
    "vit_small": {(8, 224): "vit_small_patch8_224", (16, 224): "vit_small_patch16_224",
                  (16, 384): "vit_small_patch16_384", (32, 224): "vit_small_patch32_224",
                  (32, 384): "vit_small_patch32_384"},
    "vit_base": {(8, 224): "vit_base_patch8_224", (16, 224): "vit_base_patch16_224",
                 (16, 384): "vit_base_patch16_384", (32, 224): "vit_base_patch32_224",
                 (32, 384): "vit_base_patch32_384"},
    "vit_large": {(14, 224): "vit_large_patch14_224", (16, 224): "vit_large_patch16_224",
                  (16, 384): "vit_large_patch16_384", (32, 224): "vit_large_patch32_224",
                  (32, 384): "vit_large_patch32_384"},
}
# Ours -> timm; every other key of the backbone has the same name in both.
_TIMM_RENAMES = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias"}


def backbone_state(model_state: dict[str, Tensor], which: str = "teacher") -> dict[str, Tensor]:
    """The `which` ('teacher' or 'student') backbone's tensors of an `IBOT` state dict, without the mask token."""
    if which not in ("teacher", "student"):
        raise ValueError(f"--which {which!r}: use teacher or student")
    prefix = f"{which}.backbone."
    state = {k.removeprefix(prefix): v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"the checkpoint's model state has no {prefix}* keys")
    state.pop("mask_token", None)
    return state


def to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our backbone key names -> timm's `VisionTransformer` key names."""
    return {_TIMM_RENAMES.get(k, k): v for k, v in state.items()}


def from_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's `VisionTransformer` key names -> our backbone key names (the inverse of `to_timm`)."""
    ours = {timm: mine for mine, timm in _TIMM_RENAMES.items()}
    return {ours.get(k, k): v for k, v in state.items()}


def timm_name(arch: str, patch_size: int, img_size: int) -> str:
    """timm's registered model name for our `arch` at `patch_size` and `img_size`.

    The exact entry when timm registers one (vit_small/8/224 -> `vit_small_patch8_224`), otherwise the arch's entry
    with the closest patch size, then the closest image size (ties: the smaller); the model is then built with
    `patch_size=` and `img_size=` given to `timm.create_model` (see `timm_kwargs`). A ViT-tiny/8 at 32 px gives
    `vit_tiny_patch16_224`, since timm has no tiny patch-8 model.

    Args:
        arch: our `model.arch` (`vit_tiny`, `vit_small`, `vit_base`, `vit_large`).
        patch_size: our `model.patch_size`.
        img_size: our `model.img_size`.

    Returns:
        A name from `TIMM_VITS`.

    Raises:
        ValueError: `arch` is not one of ours.
    """
    if arch not in TIMM_VITS:
        raise ValueError(f"model.arch {arch!r} has no timm ViT; one of {sorted(TIMM_VITS)}")
    entries = TIMM_VITS[arch]
    p, s = min(entries, key=lambda e: (abs(e[0] - patch_size), abs(e[1] - img_size), e))
    return entries[p, s]


def timm_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of `timm.create_model(timm_name(...), pretrained=False, num_classes=0, **kwargs)` that
    build our backbone: img_size and patch_size always (the file then states its geometry whatever the name's),
    init_values when LayerScale is on. num_classes is left to the caller, so the call above has it once."""
    kwargs: dict[str, Any] = {"img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size}
    if cfg.model.layerscale > 0:
        kwargs["init_values"] = cfg.model.layerscale
    return kwargs


def export_backbone(model_state: dict[str, Tensor], cfg: Config, out: str | Path, *, fmt: str = "timm",
                    which: str = "teacher", step: int | None = None) -> Path:
    """Write the backbone of `model_state` to `out` as safetensors in format `fmt` ('timm' or 'safetensors').

    Only a `timm` file's metadata has `timm_name` and `timm_kwargs`: a `safetensors` file keeps our key names, which
    timm's ViT does not load.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {list(FORMATS)}")
    state = backbone_state(model_state, which)
    metadata = {
        "format": fmt, "which": which, "arch": cfg.model.arch, "patch_size": str(cfg.model.patch_size),
        "img_size": str(cfg.model.img_size), "layerscale": str(cfg.model.layerscale),
        "step": "" if step is None else str(step),
    }
    if fmt == "timm":
        state = to_timm(state)
        metadata["timm_name"] = timm_name(cfg.model.arch, cfg.model.patch_size, cfg.model.img_size)
        metadata["timm_kwargs"] = json.dumps(timm_kwargs(cfg))
    # safetensors wants contiguous tensors that share no memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    data = save(tensors, metadata=metadata)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(data))
    return out


def export_main(args: argparse.Namespace) -> Path:
    model_state, cfg, path = read_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else path.parent / f"{path.stem}_{args.which}_backbone_{args.format}.safetensors"
    step = int(path.stem.split("_")[-1]) if path.stem.split("_")[-1].isdigit() else None
    out = export_backbone(model_state, cfg, out, fmt=args.format, which=args.which, step=step)
    print(f"exported the {args.which} backbone ({cfg.model.arch}/{cfg.model.patch_size}) to {out}")
    if args.format == "timm":
        name = timm_name(cfg.model.arch, cfg.model.patch_size, cfg.model.img_size)
        kwargs = "".join(f", {k}={v!r}" for k, v in timm_kwargs(cfg).items())
        print(f'load with: timm.create_model("{name}", pretrained=False, num_classes=0{kwargs})'
              ".load_state_dict(safetensors.torch.load_file(path), strict=True) "
              "(the file's metadata holds timm_name and timm_kwargs)")
    return out
