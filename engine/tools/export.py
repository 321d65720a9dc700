"""`ibot export`: one backbone of a checkpoint (or of released weights) in a released layout that others load.

`--format` (the layouts themselves, their keys and metadata, live in `ibot_engine.model.released.write_released`,
the inverse of the reader `read_released`, so one table serves both directions):

* `ibot-engine` (alias `safetensors`, the name of this format for scripts written before; the file is the same):
  safetensors with our `VisionTransformer` key names and every structural field (arch, patch and image size,
  LayerScale, registers, position encoding, norm eps, FFN, K bias) in the metadata.
* `timm` (the default): safetensors that `timm.create_model(meta["timm_name"], pretrained=False, num_classes=0,
  **json.loads(meta["timm_kwargs"]))` loads with strict=True, and whose `forward_features` then returns our
  backbone's tokens (a plain timm ViT for learned positions, registers as `reg_tokens`; timm's DINOv3 port for
  RoPE).
* `dinov2` / `dinov3`: the official hub layouts (plain `.pth` state dicts of tensors, as the official hub loaders
  read them with `torch.load`).
* `hf`: a Hugging Face transformers folder (config.json + model.safetensors; Dinov2Model, Dinov2WithRegistersModel
  or DINOv3ViTModel by the model's structure).

Each layout is read back by `read_released` into the same model (registers, RoPE, the zeroed K bias included).
The teacher's backbone is exported by default (`--which student` for the student's; our student-only mask token is
left out). `--checkpoint` takes our checkpoints (run directory, sharded checkpoint directory, `.pt` file) first,
else released weights (`ibot_engine.eval.features.read_model_source`; `--init-format`, auto-detected by default),
so a released file can be converted from one layout to another. The safetensors formats' metadata also records
which backbone, the step (ours) and the export format. Files are written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor

from ibot_engine.config import ModelConfig
from ibot_engine.eval.features import read_model_source, released_backbone_state, released_model_config
from ibot_engine.model.released import WRITE_FORMATS, timm_spec, write_released

ALIASES = {"safetensors": "ibot-engine"}  # the name `ibot export` gave our own layout before `ibot-engine`
FORMATS = (*WRITE_FORMATS, *ALIASES)


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


def canonical_format(fmt: str) -> str:
    """The layout `fmt` names (`safetensors` -> `ibot-engine`)."""
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {list(FORMATS)}")
    return fmt


def default_out(source: Path, stem: str, fmt: str) -> Path:
    """Next to `source`: `<stem>_<fmt>` with the layout's suffix (.safetensors, .pth, or none for an hf folder)."""
    suffix = {"hf": "", "dinov2": ".pth", "dinov3": ".pth"}.get(canonical_format(fmt), ".safetensors")
    return source.parent / f"{stem}_{fmt}{suffix}"


def export_backbone(state: dict[str, Tensor], model_cfg: ModelConfig, out: str | Path, *, fmt: str = "timm",
                    metadata: dict[str, str] | None = None) -> Path:
    """Write a backbone (`VisionTransformer` keys) of `model_cfg` to `out` in format `fmt` (see the module docstring);
    `metadata` (strings) goes into the safetensors formats' metadata beside the structural fields."""
    fmt = canonical_format(fmt)
    return write_released(state, model_cfg, out, fmt, dict(metadata or {}))


def export_main(args: argparse.Namespace) -> Path:
    fmt = canonical_format(args.format)
    source = read_model_source(args.checkpoint, getattr(args, "init_format", "auto"))
    if source.released is not None:
        released = source.released
        model_cfg = released_model_config(released, ModelConfig())  # the file's structure at its native size
        state = released_backbone_state(released, args.which)
        which = args.which if released.teacher is not None else "backbone"  # a backbone-only file has one
        metadata = {"which": which, "step": "", "source_format": released.format}
        stem = source.path.stem
    else:
        model_cfg = source.cfg.model
        state = backbone_state(source.state, args.which)
        which = args.which
        last = source.path.stem.split("_")[-1]  # step_00000007(.pt): the step
        metadata = {"which": which, "step": str(int(last)) if last.isdigit() else ""}
        stem = f"{source.path.stem}_{which}_backbone"
    out = Path(args.out) if args.out else default_out(source.path, stem, args.format)
    out = export_backbone(state, model_cfg, out, fmt=fmt, metadata=metadata)
    what = "backbone" if which == "backbone" else f"{which} backbone"
    print(f"exported the {what} of {source.path} ({model_cfg.arch}/{model_cfg.patch_size}) as {fmt} to {out}")
    if fmt == "timm":
        name, kwargs = timm_spec(model_cfg)
        call = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        print(f'load with: timm.create_model("{name}", pretrained=False, num_classes=0{call})'
              ".load_state_dict(safetensors.torch.load_file(path), strict=True) "
              "(the file's metadata holds timm_name and timm_kwargs)")
    elif fmt == "hf":
        print("load with: transformers.AutoModel.from_pretrained(folder)")
    return out

