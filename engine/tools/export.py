"""`ibot export`: the backbone of a checkpoint as a safetensors state dict (never a pickle).

Two formats, both the teacher's backbone by default (`--which student` for the student's; the student-only mask
token is left out):

* `safetensors`: our own `VisionTransformer` key names; `VisionTransformer(arch, patch_size, img_size,
  layerscale=...).load_state_dict(...)` takes it as is.
* `timm`: timm's ViT key names (`patch_embed.proj.*`; everything else already matches). It loads with no missing
  or unexpected keys into `timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, ...)` (and
  the tiny / base / large equivalents) given the file's `timm_kwargs` (img_size, patch_size, init_values), and
  `forward_features` then returns our backbone's tokens (same LayerNorm eps 1e-6, exact GELU, qkv bias).

The file's metadata records the format, architecture, timm model name and kwargs (JSON), which backbone and the
step. Files are written atomically.

Checkpoints are read only through `ibot_engine.checkpoint.read_checkpoint` (this command, `ibot eval` and
`ibot visualize` all use it), so a change of checkpoint format changes one function.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from ibot_engine.checkpoint import atomic_write, read_checkpoint
from ibot_engine.config import Config

FORMATS = ("timm", "safetensors")
TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
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


def timm_kwargs(cfg: Config) -> dict[str, Any]:
    """Arguments of `timm.create_model(TIMM_NAMES[arch], pretrained=False, **kwargs)` that match our backbone."""
    kwargs: dict[str, Any] = {"img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size, "num_classes": 0}
    if cfg.model.layerscale > 0:
        kwargs["init_values"] = cfg.model.layerscale
    return kwargs


def export_backbone(model_state: dict[str, Tensor], cfg: Config, out: str | Path, *, fmt: str = "timm",
                    which: str = "teacher", step: int | None = None) -> Path:
    """Write the backbone of `model_state` to `out` as safetensors in format `fmt` ('timm' or 'safetensors')."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {list(FORMATS)}")
    state = backbone_state(model_state, which)
    if fmt == "timm":
        state = to_timm(state)
    # safetensors wants contiguous tensors that share no memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {
        "format": fmt, "which": which, "arch": cfg.model.arch, "patch_size": str(cfg.model.patch_size),
        "img_size": str(cfg.model.img_size), "layerscale": str(cfg.model.layerscale),
        "timm_model": TIMM_NAMES[cfg.model.arch], "timm_kwargs": json.dumps(timm_kwargs(cfg)),
        "step": "" if step is None else str(step),
    }
    data = save(tensors, metadata=metadata)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(data))
    return out


def load_timm_model(path: str | Path) -> torch.nn.Module:
    """A timm ViT built from the metadata of a `--format timm` export, weights loaded strictly (needs timm)."""
    import timm
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "timm":
        raise ValueError(f"{str(path)!r} is not a --format timm export (metadata format={meta.get('format')!r})")
    model = timm.create_model(meta["timm_model"], pretrained=False, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def export_main(args: argparse.Namespace) -> Path:
    model_state, cfg, path = read_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else path.parent / f"{path.stem}_{args.which}_backbone_{args.format}.safetensors"
    step = int(path.stem.split("_")[-1]) if path.stem.split("_")[-1].isdigit() else None
    out = export_backbone(model_state, cfg, out, fmt=args.format, which=args.which, step=step)
    print(f"exported the {args.which} backbone ({cfg.model.arch}/{cfg.model.patch_size}) to {out}")
    if args.format == "timm":
        kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg).items())
        print(f'load with: timm.create_model("{TIMM_NAMES[cfg.model.arch]}", pretrained=False, {kwargs}) and '
              "load_state_dict(safetensors.torch.load_file(path))")
    return out
