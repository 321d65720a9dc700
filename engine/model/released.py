"""Released weights: read iBOT, DINO, DINOv2, DINOv3, timm and Hugging Face files (and our exports) into our networks'
key names, check them against a config, fit the position embedding to a resolution, and write them back out.

`read_released(path, fmt="auto")` reads safely (safetensors, or `torch.load(weights_only=True, mmap=True)`: never a
full unpickling; tensors stay mapped from the file until a model copies them), detects the layout from the keys and
metadata, converts to `IBOTNetwork` keys (`backbone.*`, `head.*`) and infers the `ModelConfig` fields the file fixes.
Each bad input is one `ValueError` naming the file and the keys.

What each layout holds and how it maps to ours (`VisionTransformer` keys; i = block index):

| file key                                   | ours                         | layouts                                  |
|--------------------------------------------|------------------------------|------------------------------------------|
| patch_embed.proj.{weight,bias}             | patch_embed.{weight,bias}    | all but ours                             |
| masked_embed [1,D]                         | mask_token                   | iBOT student                             |
| mask_token [1,D]                           | mask_token                   | DINOv2, DINOv3 (timm drops it)           |
| register_tokens, storage_tokens, reg_token | register_tokens [1,R,D]      | DINOv2 reg, DINOv3, timm                 |
| blocks.i.gamma_1 / gamma_2                 | blocks.i.ls1 / ls2.gamma     | iBOT (init_values > 0), timm Eva         |
| blocks.i.attn.q_bias + v_bias              | attn.qkv.bias = [q, 0, v]    | timm Eva `_qkvb`: qkv_k_bias False       |
| (no qkv bias in any block)                 | attn.qkv.bias = 0            | timm Eva, no `_qkvb`: qkv_k_bias False   |
| blocks.i.attn.qkv.bias_mask                | checked, dropped (1)         | DINOv3                                   |
| rope_embed.periods                         | checked, dropped (2)         | DINOv3                                   |
| blocks.i.mlp.fc1_g / fc1_x / fc2           | mlp.w1 / w2 / w3             | timm Eva SwiGLU (DINOv3 S+)              |
| pos_embed [1,N,D], no cls slot (3)         | pos_embed [1,1+N,D]          | timm `no_embed_class` (DINOv2 reg)       |
| local_cls_norm.*                           | dropped                      | DINOv3 7B (train-time only)              |
| head.weight / head.bias (a classifier)     | dropped, warned              | timm                                     |

(1) ones / zeros / ones by thirds (mask_k_bias) -> qkv_k_bias False, and the K third of the bias is zeroed in the
state; all ones -> True; anything else is an error. (2) must be base 100 ** (4 i / head dim) within bf16 rounding
(released files may hold bf16-rounded periods; our RoPE computes them in fp32, as timm does). (3) its cls_token
already holds the cls position (timm folds it in): the cls slot we add is zero.

Checkpoints: iBOT / DINO full files (`student` with `module.backbone.*` / `module.head.*`, `teacher` with
`backbone.*` / `head.*`) give both networks with their heads; `ibot_loss.center [1,K]` -> cls_center,
`ibot_loss.center2 [1,1,K]` -> patch_center, `dino_loss.center` -> cls_center (DINO has no patch head: our shared
head serves both). Head keys `mlp.{0,2,4}.*`, `last_layer.weight_g / weight_v` keep their names (`mlp.*` of a
one-layer head -> `mlp.0.*`). iBOT's `last_layer2` is the patch head: an alias of `last_layer` (shared head, equal
tensors) is dropped silently; a separate one is dropped with one warning (we share one head), and so is a patch
centre computed on a separate teacher patch head. `{'state_dict': ...}` (iBOT's extract_backbone_weights, with or
without its head), `{'model': ...}`, `{'teacher': ...}` (DINOv2 / DINOv3 training files: their `dino_head` /
`ibot_head` are dropped with a warning) and plain state dicts are backbone files. The iBOT / DINO `args` (an
`argparse.Namespace`) is the one non-tensor type allowed in the file; it tells `norm_last_layer`.

Fields inferred: arch from the embed dim, depth and feed-forward width (the head count cannot be read from weights;
all our archs have head dim 64, which RoPE periods confirm), patch size from the patch embedding, the native
`img_size` from the position-embedding grid x patch (224 for RoPE), `layerscale` 1e-5 (DINOv2 / DINOv3's init; the
file's gammas replace it) when the file has gammas, register count, RoPE, `norm_eps` (1e-5 for the DINOv3 layouts,
which alone use RoPE and storage tokens; 1e-6 otherwise), SwiGLU, the K bias, and the head sizes. Our own exports
(`ibot-engine`, and the `safetensors` / `timm` files `ibot export` wrote before) state them in the metadata.

`write_released` writes the inverse: `ibot-engine` (safetensors, our keys, every structural field in the metadata),
`timm` (safetensors that `timm.create_model(meta["timm_name"], pretrained=False, num_classes=0,
**json.loads(meta["timm_kwargs"]))` loads with strict=True), `dinov2` / `dinov3` (the official hub layouts as plain
`.pth` state dicts, since the official loaders read them with `torch.load`; loadable with weights_only=True) and `hf`
(`ibot_engine.model.hf_format`).

Shapes: D embed dim, R register tokens, N patch positions, K prototypes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ibot_engine.config import ConfigError, ModelConfig, keys_message
from ibot_engine.model.vit import ARCHS

log = logging.getLogger(__name__)

FORMATS = ("ibot", "dino", "dinov2", "dinov3", "timm", "hf", "ibot-engine")
WRITE_FORMATS = ("ibot-engine", "timm", "dinov2", "dinov3", "hf")
ROPE_NATIVE_SIZE = 224  # DINOv3's hub img_size: RoPE has no grid of its own
RELEASED_LAYERSCALE = 1e-5  # DINOv2 / DINOv3's LayerScale init; a file's gammas replace it
DINOV3_NORM_EPS = 1e-5  # DINOv3's "layernormbf16"
DEFAULT_NORM_EPS = 1e-6  # iBOT, DINO, DINOv2, timm's ViT
DINOV3_ROPE_BASE = 100.0
# Backbone fields a file fixes beyond arch / patch_size / img_size, and the head fields of a file with heads.
BACKBONE_FIELDS = ("layerscale", "num_register_tokens", "pos_embed", "rope_base", "norm_eps", "ffn", "qkv_k_bias")
HEAD_FIELDS = ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers", "norm_last_layer")

# The plain ViTs timm 1.0.31 registers for each of our archs, by (patch size, image size): the table from our arch
# names to timm's, moved here from ibot_engine.tools.export (which the model package may not import). Data rather
# than a `timm.list_models` query, since the engine does not depend on timm. CLIP / DINOv2 / DINOv3 / SigLIP / RoPE /
# register / parallel-block variants are left out: registers are given as kwargs (`timm_spec`), RoPE models use
# `TIMM_DINOV3`.
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
    "vit_small_plus": {},  # a SwiGLU arch (DINOv3 S+): no plain timm ViT; RoPE exports use TIMM_DINOV3
}
# timm's DINOv3 ports (the Eva class) with q / v biases, for our RoPE backbones. Their LayerNorm eps is 1e-5, they
# have no K bias, and S+ is the SwiGLU one.
TIMM_DINOV3: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_dinov3_qkvb", "vit_small": "vit_small_patch16_dinov3_qkvb",
    "vit_small_plus": "vit_small_plus_patch16_dinov3_qkvb", "vit_base": "vit_base_patch16_dinov3_qkvb",
    "vit_large": "vit_large_patch16_dinov3_qkvb",
}


@dataclass(frozen=True)
class ReleasedWeights:
    """A released file read into our key names.

    `student` / `teacher` hold `IBOTNetwork` keys (`backbone.*`, plus `head.*` when the file has heads); tensors are
    in the file's dtype and may be memory-mapped from it. `backbone.mask_token` may be absent (a teacher, DINO):
    it then starts at zero as in the official init. `model` holds the `ModelConfig` fields the file fixes: arch,
    patch_size, img_size (the native grid x patch), layerscale, num_register_tokens, pos_embed, rope_base, norm_eps,
    ffn, qkv_k_bias; plus out_dim, head_hidden_dim (heads of 2+ layers), head_bottleneck_dim, head_layers and
    norm_last_layer when it has heads.
    """

    path: Path
    format: str
    model: dict[str, Any]
    student: dict[str, Tensor]
    teacher: dict[str, Tensor] | None
    cls_center: Tensor | None
    patch_center: Tensor | None

    @property
    def has_heads(self) -> bool:
        return any(k.startswith("head.") for k in self.student)


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _is_safetensors(path: Path) -> bool:
    """safetensors files open with an 8-byte header length and then the JSON header; zip-format torch files with
    'PK', legacy ones with a pickle opcode."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from None
    return tensors, metadata


def _unpickling_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line.lower()]
    return lines[-1] if lines else str(err).splitlines()[0]


def _torch_load(path: Path) -> Any:
    """`torch.load` with weights_only=True (tensors, containers, numbers and strings; plus `argparse.Namespace`,
    the `args` of the official iBOT / DINO checkpoints, a plain attribute bag) and mmap=True (nothing is read until
    used). Files in the pre-1.6 serialisation cannot be mapped and are read into memory, still weights_only."""

    def load(mmap: bool) -> Any:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return load(mmap=False)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise ValueError(f"{path}: holds objects other than tensors ({_unpickling_reason(e)}); released weights "
                             "are read with torch.load(weights_only=True), never by unpickling arbitrary objects: "
                             "save a plain state dict of tensors (or safetensors)") from None
        raise ValueError(f"{path}: not a readable PyTorch file (truncated or damaged?): {e}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch file (truncated or damaged?): {first}") from None


def _tensors_only(state: Any, file: Path, what: str) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{file}: {what} is not a state dict of tensors")
    others = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if others:
        raise ValueError(f"{file}: {what} holds entries that are not tensors: {keys_message(others)}")
    return state


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _split_network(state: dict[str, Tensor], file: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """(backbone, head, dropped keys) of one network's state dict, prefixes removed.

    `module.` (DDP) is stripped; `backbone.*` / `head.*` split a wrapped network; `dino_head.*` / `ibot_head.*`
    (DINOv2 / DINOv3 training files) are dropped. A backbone file may carry a projection head (iBOT's
    extract_backbone_weights --with_head) as `head.mlp.*` / `head.last_layer*`; a timm classifier `head.weight` stays
    with the backbone (dropped there)."""
    state = _strip(state, "module.")
    backbone, head, dropped = {}, {}, []
    wrapped = any(k.startswith("backbone.") for k in state)
    for k, v in state.items():
        if k.startswith("backbone."):
            backbone[k.removeprefix("backbone.")] = v
        elif k.startswith(("head.mlp", "head.last_layer")) or (wrapped and k.startswith("head.")):
            head[k.removeprefix("head.")] = v
        elif k.startswith(("dino_head.", "ibot_head.")):
            dropped.append(k)
        elif wrapped:
            raise ValueError(f"{file}: keys beside backbone.* and head.* in a network's state: "
                             f"{keys_message(k2 for k2 in state if not k2.startswith(('backbone.', 'head.')))}")
        else:
            backbone[k] = v
    return backbone, head, dropped


@dataclass
class _Backbone:
    state: dict[str, Tensor]
    fields: dict[str, Any]
    layout: str  # ours | dinov3 | dinov2 | timm | ibot | plain
    periods: Tensor | None
    dropped: list[str]


_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed."),
    (re.compile(r"^masked_embed$"), "mask_token"),
    (re.compile(r"^(storage_tokens|reg_token)$"), "register_tokens"),
    (re.compile(r"^blocks\.(\d+)\.gamma_([12])$"), r"blocks.\1.ls\2.gamma"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1_g\."), r"blocks.\1.mlp.w1."),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1_x\."), r"blocks.\1.mlp.w2."),
)


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _depth(keys: Any) -> int:
    blocks = {int(m[1]) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


def _layout(keys: set[str]) -> str:
    if "patch_embed.weight" in keys:
        return "ours"
    if {"storage_tokens", "rope_embed.periods"} & keys or any(k.endswith(".bias_mask") for k in keys):
        return "dinov3"
    if {"mask_token", "register_tokens"} & keys:
        return "dinov2"
    eva = any(k.endswith((".q_bias", ".mlp.fc1_g.weight")) for k in keys)
    if eva or "reg_token" in keys or ("pos_embed" not in keys and "blocks.0.gamma_1" in keys):
        return "timm"
    if "masked_embed" in keys or "blocks.0.gamma_1" in keys:
        return "ibot"
    if "blocks.0.ls1.gamma" in keys:
        return "timm"  # timm's DINOv2 port: DINOv2 keys without the mask token
    return "plain"


def _backbone_to_ours(raw: dict[str, Tensor], file: Path) -> _Backbone:
    """File backbone keys -> ours, with the fields the keys alone tell (arch and the checks come later)."""
    keys = set(raw)
    if "cls_token" not in keys or not {"patch_embed.proj.weight", "patch_embed.weight"} & keys:
        raise ValueError(f"{file}: not a ViT backbone of a layout we read (no cls_token / patch_embed.proj.weight); "
                         f"its keys: {keys_message(keys)}")
    layout = _layout(keys)
    eva_swiglu = any(k.endswith(".mlp.fc1_g.weight") for k in keys)
    state: dict[str, Tensor] = {}
    periods, masks, qv, dropped, unsupported = None, {}, {}, [], []
    for k, v in raw.items():
        if k == "rope_embed.periods":
            periods = v
        elif m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.bias_mask", k):
            masks[int(m[1])] = v
        elif m := re.fullmatch(r"blocks\.(\d+)\.attn\.([qv])_bias", k):
            qv[int(m[1]), m[2]] = v
        elif k.startswith("local_cls_norm.") or (k in ("head.weight", "head.bias") and v.dim() <= 2):
            dropped.append(k)  # DINOv3-7B's train-time local-crop norm; a timm classifier
        elif k.startswith(("cls_norm.", "fc_norm.", "norm_pre.", "rope.")):
            unsupported.append(k)
        else:
            k = _rename(k)
            if eva_swiglu:
                k = re.sub(r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.w3.", k)
            state[k] = v
    if unsupported:
        raise ValueError(f"{file}: keys of layers our ViT does not have (DINOv3's untied cls norm, a fc_norm / "
                         f"norm_pre, an Eva RoPE buffer): {keys_message(unsupported)}")
    depth = _depth(state)
    dim = state["cls_token"].shape[-1]
    fields: dict[str, Any] = {}
    # qkv bias: Eva's q / v parts (K fixed at zero), or none at all (zero), or DINOv3's K mask.
    k_bias = True
    if qv:
        for i in range(depth):
            if (i, "q") not in qv or (i, "v") not in qv:
                raise ValueError(f"{file}: blocks.{i}.attn.q_bias / v_bias incomplete (timm Eva layout)")
            q = qv[i, "q"]
            state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), qv[i, "v"]])
        k_bias = False
    elif depth and not any(f"blocks.{i}.attn.qkv.bias" in state for i in range(depth)):
        weight = state.get("blocks.0.attn.qkv.weight")
        if weight is not None:  # no qkv bias anywhere (timm's Eva without _qkvb): zeros are the same function
            for i in range(depth):
                state[f"blocks.{i}.attn.qkv.bias"] = weight.new_zeros(weight.shape[0])
            k_bias = False
    if masks:
        k_bias = _check_bias_masks(masks, depth, dim, file)
        if not k_bias:  # hold the masked third at zero in the state too, so every writer sees the function
            for i in range(depth):
                bias = state.get(f"blocks.{i}.attn.qkv.bias")
                if bias is not None:
                    bias = bias.clone()
                    bias[dim : 2 * dim] = 0
                    state[f"blocks.{i}.attn.qkv.bias"] = bias
    fields["qkv_k_bias"] = k_bias
    if "pos_embed" in state:
        pos = state["pos_embed"]
        n = pos.shape[1]
        if math.isqrt(n - 1) ** 2 == n - 1:
            grid = math.isqrt(n - 1)
        elif math.isqrt(n) ** 2 == n:  # timm's no_embed_class: no cls slot; its cls_token holds the cls position
            grid = math.isqrt(n)
            state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
            layout = "timm" if layout == "plain" else layout
        else:
            raise ValueError(f"{file}: pos_embed {list(pos.shape)} holds no square grid of patch positions")
        fields["pos_embed"] = "learned"
    elif layout in ("dinov3", "timm", "ours") and depth:
        grid = None
        fields["pos_embed"] = "rope"
    else:
        raise ValueError(f"{file}: no pos_embed and no RoPE (DINOv3) keys; its keys: {keys_message(keys)}")
    weight = state["patch_embed.weight"]
    if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{file}: patch embedding weight {list(weight.shape)} is not a square RGB conv [D, 3, p, p]")
    patch = int(weight.shape[-1])
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    rope = fields["pos_embed"] == "rope"
    fields.update(
        patch_size=patch, img_size=grid * patch if grid is not None else ROPE_NATIVE_SIZE,
        layerscale=RELEASED_LAYERSCALE if "blocks.0.ls1.gamma" in state else 0.0,
        num_register_tokens=int(registers), rope_base=DINOV3_ROPE_BASE,
        # Only DINOv3 uses RoPE and storage tokens, and its LayerNorms have eps 1e-5.
        norm_eps=DINOV3_NORM_EPS if rope or layout == "dinov3" else DEFAULT_NORM_EPS,
        ffn="swiglu" if "blocks.0.mlp.w1.weight" in state else "mlp",
    )
    return _Backbone(state, fields, layout, periods, dropped)


def _check_bias_masks(masks: dict[int, Tensor], depth: int, dim: int, file: Path) -> bool:
    """DINOv3's qkv bias_mask buffers: 1 on the Q and V thirds and 0 on K (mask_k_bias) -> False; all ones -> True;
    anything else (e.g. the NaN of a never-initialised buffer) is an error."""
    masked = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    kinds = set()
    for i in range(depth):
        mask = masks.get(i)
        if mask is None:
            raise ValueError(f"{file}: blocks.{i}.attn.qkv.bias_mask missing while other blocks have one")
        mask = mask.float()
        if mask.shape == masked.shape and torch.equal(mask, masked):
            kinds.add(False)
        elif mask.shape == masked.shape and torch.equal(mask, torch.ones_like(masked)):
            kinds.add(True)
        else:
            raise ValueError(f"{file}: blocks.{i}.attn.qkv.bias_mask is neither DINOv3's K mask (ones, zeros, ones by "
                             "thirds) nor all ones")
    if len(kinds) > 1:
        raise ValueError(f"{file}: the blocks' attn.qkv.bias_mask differ (some mask the K bias, some do not)")
    return kinds.pop()


def _check_periods(periods: Tensor, head_dim: int, base: float, file: Path) -> None:
    expected = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    if periods.shape != expected.shape:
        raise ValueError(f"{file}: rope_embed.periods {list(periods.shape)}: a head dim of {head_dim} (our arch) "
                         f"gives {head_dim // 4} periods")
    # Released files may hold periods rounded to bf16 (timm notes it), so the check allows bf16's 2^-8.
    if not torch.allclose(periods.float(), expected, rtol=1e-2, atol=0):
        raise ValueError(f"{file}: rope_embed.periods are not base {base:g} ** (4 i / {head_dim}) (DINOv3's RoPE; "
                         "min / max period RoPE is not supported)")


def _head_to_ours(raw: dict[str, Tensor], file: Path, role: str) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """A projection head's keys -> ours; its fields; the keys of a separate `last_layer2` (dropped)."""
    head, second = {}, {}
    for k, v in raw.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        if k.startswith("last_layer2."):
            second[k.removeprefix("last_layer2.")] = v
            continue
        head[re.sub(r"^mlp\.(weight|bias)$", r"mlp.0.\1", k)] = v
    unknown = [f"head.{k}" for k in head if not re.fullmatch(r"mlp\.\d+\.(weight|bias)|last_layer\.weight_[gv]", k)]
    missing = [f"head.last_layer.{n}" for n in ("weight_g", "weight_v") if f"last_layer.{n}" not in head]
    if unknown or missing:
        problem = f"unexpected keys {keys_message(unknown)}" if unknown else f"missing {keys_message(missing)}"
        raise ValueError(f"{file}: the {role} head is not a DINO / iBOT head (mlp.N Linear layers and a "
                         f"weight-normed last_layer): {problem}")
    linears = sorted(int(m[1]) for k in head if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)))
    if linears != list(range(0, 2 * len(linears), 2)):
        raise ValueError(f"{file}: the {role} head's mlp has layers at {linears}: a head with normalisation layers "
                         "(use_bn / norm_in_head) is not supported; ours is Linear-GELU only")
    weight_v = head["last_layer.weight_v"]
    fields: dict[str, Any] = {"out_dim": int(weight_v.shape[0]), "head_bottleneck_dim": int(weight_v.shape[1]),
                              "head_layers": len(linears)}
    if len(linears) > 1:
        fields["head_hidden_dim"] = int(head["mlp.0.weight"].shape[0])
    separate = []
    if second:
        alias = all(name in head and head[name].shape == v.shape and torch.equal(head[name], v)
                    for name, v in ((f"last_layer.{n}", t) for n, t in second.items()))
        if not alias:
            separate = [f"head.last_layer2.{n}" for n in sorted(second)]
    return head, fields, separate


def _meta_network(fields: dict[str, Any]):
    """Our student network built on the meta device (no memory) from `fields`: the key set and shapes to check."""
    from ibot_engine.model.ibot import IBOTNetwork

    with torch.device("meta"):
        return IBOTNetwork(ModelConfig(**fields), student=True)


def _mismatch(state: dict[str, Tensor], expected: dict[str, torch.Size], optional: tuple[str, ...] = ()) -> str:
    missing = sorted(set(expected) - set(state) - set(optional))
    unknown = sorted(set(state) - set(expected))
    shapes = [f"{k} {list(state[k].shape)} (ours {list(expected[k])})" for k in state
              if k in expected and state[k].shape != expected[k]]
    parts = [f"missing keys: {keys_message(missing)}"] if missing else []
    parts += [f"unexpected keys: {keys_message(unknown)}"] if unknown else []
    parts += [f"shapes: {', '.join(shapes[:6])}"] if shapes else []
    return "; ".join(parts)


def _arch_for(backbone: _Backbone, file: Path) -> str:
    """The arch whose backbone has exactly the file's keys and shapes (embed dim, depth, feed-forward width)."""
    dim, depth = int(backbone.state["cls_token"].shape[-1]), _depth(backbone.state)
    candidates = [name for name, a in ARCHS.items() if (a.embed_dim, a.depth) == (dim, depth)]
    if not candidates:
        known = "; ".join(f"{n} {a.embed_dim} wide, {a.depth} blocks" for n, a in ARCHS.items())
        raise ValueError(f"{file}: a ViT {dim} wide (cls_token {list(backbone.state['cls_token'].shape)}) with "
                         f"{depth} blocks (blocks.0-{depth - 1}.*) is none of our archs ({known})")
    problems = []
    for name in candidates:
        net = _meta_network({**_backbone_fields(backbone.fields), "arch": name})
        expected = {k.removeprefix("backbone."): v.shape for k, v in net.state_dict().items()
                    if k.startswith("backbone.")}
        problem = _mismatch(backbone.state, expected, optional=("mask_token",))
        if not problem:
            return name
        problems.append(f"model.arch={name}: {problem}")
    raise ValueError(f"{file}: the backbone's keys do not fit our ViT of its size: {' | '.join(problems)}")


def _backbone_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: fields[k] for k in ("patch_size", "img_size", *BACKBONE_FIELDS) if k in fields}


def _metadata_fields(metadata: dict[str, str], file: Path) -> dict[str, Any]:
    """The structural fields our exports write into safetensors metadata (absent ones are left out)."""
    kinds: dict[str, Any] = {"arch": str, "patch_size": int, "img_size": int, "layerscale": float,
                             "num_register_tokens": int, "pos_embed": str, "rope_base": float, "norm_eps": float,
                             "ffn": str, "qkv_k_bias": lambda s: {"true": True, "false": False}[s.lower()]}
    fields = {}
    for key, kind in kinds.items():
        if metadata.get(key, "") != "":
            try:
                fields[key] = kind(metadata[key])
            except (ValueError, KeyError):
                raise ValueError(f"{file}: metadata {key}={metadata[key]!r} is not a valid value") from None
    return fields


def _apply_metadata(fields: dict[str, Any], metadata: dict[str, str], file: Path) -> dict[str, Any]:
    """Metadata of our exports states what the keys cannot (norm eps, RoPE base, LayerScale init, the K bias rule,
    a RoPE model's size); what the keys tell must agree with it."""
    stated = _metadata_fields(metadata, file)
    for key in ("arch", "patch_size", "num_register_tokens", "pos_embed", "ffn"):
        if key in stated and stated[key] != fields[key]:
            raise ValueError(f"{file}: metadata {key}={stated[key]!r} but the tensors give {fields[key]!r}")
    if "img_size" in stated and fields["pos_embed"] == "learned" and stated["img_size"] != fields["img_size"]:
        raise ValueError(f"{file}: metadata img_size={stated['img_size']} but pos_embed's grid gives "
                         f"{fields['img_size']}")
    out = dict(fields)
    for key in ("img_size", "norm_eps", "rope_base", "qkv_k_bias"):
        if key in stated:
            out[key] = stated[key]
    if "layerscale" in stated and (stated["layerscale"] > 0) == (fields["layerscale"] > 0):
        out["layerscale"] = stated["layerscale"]
    return out


def _label(layout: str, metadata: dict[str, str], full: str | None, wrapped: bool) -> tuple[str, tuple[str, ...]]:
    """The detected format and the formats a user may name for this file (same layout under several names)."""
    if metadata.get("format") in ("ibot-engine", "safetensors") and layout == "ours":
        return "ibot-engine", ("ibot-engine",)
    if metadata.get("format") == "timm" or "timm_name" in metadata:
        return "timm", ("timm",)
    if full is not None:
        return full, ("ibot", "dino")
    if layout == "ours":
        return "ibot-engine", ("ibot-engine",)
    if layout in ("dinov3", "dinov2", "timm"):
        return layout, (layout,)
    if layout == "ibot":
        return "ibot", ("ibot", "dino")
    return ("ibot" if wrapped else "dino"), ("ibot", "dino", "timm")


def _find_networks(obj: Any, file: Path) -> tuple[dict, dict | None, dict, str | None, bool]:
    """(student state, teacher state or None, extras, full-checkpoint kind or None, wrapped) of a loaded file."""
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, None, {}, None, False
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    if isinstance(obj.get("student"), dict):
        teacher = obj.get("teacher") if isinstance(obj.get("teacher"), dict) else None
        student = _tensors_only(obj["student"], file, "'student'")
        teacher = _tensors_only(teacher, file, "'teacher'") if teacher is not None else None
        if "ibot_loss" in obj:
            kind = "ibot"
        elif "dino_loss" in obj:
            kind = "dino"
        else:
            kind = "ibot" if any(k.endswith("masked_embed") for k in student) else "dino"
        return student, teacher, obj, kind, False
    for key in ("state_dict", "model", "model_ema", "teacher", "module"):
        if isinstance(obj.get(key), dict):
            return _tensors_only(obj[key], file, repr(key)), None, obj, None, key == "state_dict"
    raise ValueError(f"{file}: no state dict found; top-level keys: {keys_message(str(k) for k in obj)}")


def read_released(path: str | Path, fmt: str = "auto") -> ReleasedWeights:
    """Read released weights into our key names (see the module docstring for what each layout holds).

    Args:
        path: a .pth / .pt / .bin / .safetensors file (the container is sniffed, not taken from the suffix), or a
            Hugging Face folder (config.json + model.safetensors).
        fmt: "auto" (detected from the keys and metadata) or one of FORMATS; a named format must fit the file's
            layout (DINO's, iBOT's backbone and timm's plain ViT layouts are the same and take either name).

    Returns:
        The `ReleasedWeights`.

    Raises:
        ValueError: naming the file and the keys, for a missing, truncated or unreadable file, a pickle that holds
            more than tensors, a layout that is not a ViT we read, sizes none of our archs has, or a `fmt` that
            does not fit the file.
    """
    file = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"model.init_format={fmt!r}: one of {['auto', *FORMATS]}")
    if not file.exists():
        raise ValueError(f"{file}: no such file or folder")
    if file.is_file() and fmt == "hf" and (file.parent / "config.json").is_file():
        file = file.parent  # the weights file of a Hugging Face folder
    if file.is_dir():
        return _read_hf(file, fmt)
    if fmt == "hf":
        raise ValueError(f"{file}: model.init_format=hf needs a Hugging Face folder (config.json + model.safetensors)")
    if _is_safetensors(file):
        obj, metadata = _read_safetensors(file)
    else:
        obj, metadata = _torch_load(file), {}
    student_raw, teacher_raw, extras, full, wrapped = _find_networks(obj, file)
    if any(k.startswith("embeddings.") for k in student_raw):  # transformers' keys: the weights of an HF folder
        if (file.parent / "config.json").is_file():
            return _read_hf(file.parent, fmt)
        raise ValueError(f"{file}: Hugging Face transformers keys (embeddings.*) without a config.json beside it: "
                         "pass the model folder")

    backbone_raw, head_raw, dropped = _split_network(student_raw, file)
    backbone = _backbone_to_ours(backbone_raw, file)
    label, accepted = _label(backbone.layout, metadata, full, wrapped)
    if fmt != "auto" and fmt not in accepted:
        raise ValueError(f"{file}: model.init_format={fmt} does not fit the file: its layout is {label}'s "
                         f"(keys {keys_message(backbone_raw)})")
    # Metadata changes no shape (norm eps, RoPE base, the K bias rule, LayerScale's init), so the arch stands.
    fields = {"arch": _arch_for(backbone, file), **backbone.fields}
    if metadata:
        fields = _apply_metadata(fields, metadata, file)
    arch = fields["arch"]
    if backbone.periods is not None:
        a = ARCHS[arch]
        _check_periods(backbone.periods, a.embed_dim // a.num_heads, fields["rope_base"], file)

    student = {f"backbone.{k}": v for k, v in backbone.state.items()}
    separate: list[str] = []
    if head_raw:
        head, head_fields, separate = _head_to_ours(head_raw, file, "student")
        student.update({f"head.{k}": v for k, v in head.items()})
        fields.update(head_fields)
        fields["norm_last_layer"] = _norm_last_layer(extras, head["last_layer.weight_g"])
    teacher = None
    teacher_separate: list[str] = []
    if teacher_raw is not None:
        t_backbone_raw, t_head_raw, t_dropped = _split_network(teacher_raw, file)
        dropped += t_dropped
        t_backbone = _backbone_to_ours(t_backbone_raw, file)
        if _backbone_fields(t_backbone.fields) != _backbone_fields(backbone.fields):
            raise ValueError(f"{file}: the teacher's backbone differs in structure from the student's")
        teacher = {f"backbone.{k}": v for k, v in t_backbone.state.items()}
        if bool(t_head_raw) != bool(head_raw):
            raise ValueError(f"{file}: only one of student and teacher has a head")
        if t_head_raw:
            t_head, t_head_fields, teacher_separate = _head_to_ours(t_head_raw, file, "teacher")
            if any(t_head_fields.get(k) != fields.get(k) for k in t_head_fields):
                raise ValueError(f"{file}: the teacher's head sizes {t_head_fields} differ from the student's")
            teacher.update({f"head.{k}": v for k, v in t_head.items()})
        dropped += t_backbone.dropped
    _check_network(student, fields, file, "student")
    if teacher is not None:
        _check_network(teacher, fields, file, "teacher")
    cls_center, patch_center, centre_notes = _centres(extras, fields, file, bool(teacher_separate))

    dropped += backbone.dropped
    if dropped:
        log.warning("%s: dropped %s (no counterpart in our network)", file, keys_message(dropped))
    if separate or teacher_separate or centre_notes:
        what = [f"student {keys_message(separate)}"] if separate else []
        what += [f"teacher {keys_message(teacher_separate)}"] if teacher_separate else []
        what += centre_notes
        log.warning("%s: dropped the separate patch head (we share one head for cls and patch tokens): %s",
                    file, "; ".join(what))
    return ReleasedWeights(path=file, format=fmt if fmt != "auto" else label, model=fields, student=student,
                           teacher=teacher, cls_center=cls_center, patch_center=patch_center)


def _norm_last_layer(extras: dict, weight_g: Tensor) -> bool:
    """The official `args.norm_last_layer` when the checkpoint has its args; else whether every gain is exactly 1
    (frozen gains never move; trained ones never all stay at their init of 1)."""
    args = extras.get("args")
    if isinstance(args, argparse.Namespace) and isinstance(getattr(args, "norm_last_layer", None), bool):
        return args.norm_last_layer
    return bool(torch.all(weight_g == 1))


def _check_network(state: dict[str, Tensor], fields: dict[str, Any], file: Path, role: str) -> None:
    expected = {k: v.shape for k, v in _meta_network(fields).state_dict().items()}
    if not any(k.startswith("head.") for k in state):
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    problem = _mismatch(state, expected, optional=("backbone.mask_token",))
    if problem:
        raise ValueError(f"{file}: the {role} does not fit our network of the file's sizes: {problem}")


def _centres(extras: dict, fields: dict[str, Any], file: Path,
             teacher_separate: bool) -> tuple[Tensor | None, Tensor | None, list[str]]:
    loss = extras.get("ibot_loss") or extras.get("dino_loss")
    if not isinstance(loss, dict) or not isinstance(loss.get("center"), Tensor):
        return None, None, []
    K = fields.get("out_dim")
    cls_center = loss["center"].reshape(-1)
    if K is None or cls_center.numel() != K:
        raise ValueError(f"{file}: the loss centre has {cls_center.numel()} entries, the head {K} prototypes")
    patch_center, notes = None, []
    if isinstance(loss.get("center2"), Tensor):
        patch_center = loss["center2"].reshape(-1)
        if teacher_separate or patch_center.numel() != K:
            notes.append(f"ibot_loss.center2 [{patch_center.numel()}] (the separate patch head's centre)")
            patch_center = None
    return cls_center, patch_center, notes


def _read_hf(folder: Path, fmt: str) -> ReleasedWeights:
    """A transformers folder; or a timm Hub folder (its config.json names a timm `architecture` and has no
    `model_type`), whose weights file is then read as any file."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = None
    if isinstance(config, dict) and "architecture" in config and "model_type" not in config:
        if fmt == "hf":
            raise ValueError(f"{folder}: a timm folder (config.json architecture={config['architecture']!r}), not a "
                             "transformers one: use model.init_format=auto or timm")
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                return read_released(folder / name, fmt)
    if fmt not in ("auto", "hf"):
        raise ValueError(f"{folder}: a folder is read as a Hugging Face model folder (model.init_format=hf), not "
                         f"{fmt}")
    from ibot_engine.model.hf_format import read_hf_folder

    fields, state = read_hf_folder(folder)
    student = {f"backbone.{k}": v for k, v in state.items()}
    _check_network(student, fields, folder, "backbone")
    return ReleasedWeights(path=folder, format="hf", model=dict(fields), student=student, teacher=None,
                           cls_center=None, patch_center=None)


# ----------------------------------------------------------------------------------------------------------------
# Config and resolution


def check_model(released: ReleasedWeights, model_cfg: ModelConfig) -> None:
    """The config's arch and patch size must be the file's (nothing else converts: a ViT-B file needs
    model.arch=vit_base).

    Raises:
        ConfigError: naming model.arch or model.patch_size, the file and its value.
    """
    arch, patch = released.model["arch"], released.model["patch_size"]
    if model_cfg.arch != arch:
        raise ConfigError(f"config key 'model.arch' = {model_cfg.arch} but {released.path} holds a {arch} backbone; "
                          f"set model.arch={arch}")
    if model_cfg.patch_size != patch:
        raise ConfigError(f"config key 'model.patch_size' = {model_cfg.patch_size} but {released.path} has patch "
                          f"size {patch} (its patch_embed weight is [D, 3, {patch}, {patch}]); set "
                          f"model.patch_size={patch}")


def model_config_for(released: ReleasedWeights, model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with the structural fields the file fixes (registers, RoPE and its base, norm eps, FFN, K bias,
    LayerScale; the head sizes when the file has heads). arch and patch size are checked (`check_model`), not
    set; img_size stays the config's (the training resolution: `fit_state` resamples to it)."""
    check_model(released, model_cfg)
    names = BACKBONE_FIELDS + (HEAD_FIELDS if released.has_heads else ())
    return dataclasses.replace(model_cfg, **{k: released.model[k] for k in names if k in released.model})


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """A [1, P + h0*w0, D] position embedding with its square patch grid resampled to `grid` as timm's
    `resample_abs_pos_embed` does (bicubic, antialias, align_corners False, in fp32, back to the input dtype); the P
    prefix positions (our cls) are kept."""
    n = pos_embed.shape[1] - num_prefix_tokens
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"pos_embed {list(pos_embed.shape)} holds no square grid after {num_prefix_tokens} prefix")
    if (old, old) == tuple(grid):
        return pos_embed
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    x = patch.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    x = x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)


def fit_state(state: dict[str, Tensor], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """`state` with every position embedding (`pos_embed` or `*.pos_embed`) resampled once to model_cfg.img_size's
    patch grid (`resample_pos_embed`), so our model at that size equals timm's model created at that size from the
    same file. Other tensors are passed through as they are; RoPE states have nothing to fit."""
    grid = model_cfg.img_size // model_cfg.patch_size
    return {k: resample_pos_embed(v, (grid, grid)) if k == "pos_embed" or k.endswith(".pos_embed") else v
            for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------------
# Writing


def timm_name(arch: str, patch_size: int, img_size: int) -> str:
    """timm's registered plain-ViT name for our `arch` at `patch_size` and `img_size`.

    The exact entry when timm registers one (vit_small/8/224 -> `vit_small_patch8_224`), otherwise the arch's entry
    with the closest patch size, then the closest image size (ties: the smaller); the model is then built with
    `patch_size=` and `img_size=` given to `timm.create_model` (see `timm_spec`). A ViT-tiny/8 at 32 px gives
    `vit_tiny_patch16_224`, since timm has no tiny patch-8 model.

    Args:
        arch: our `model.arch`.
        patch_size: our `model.patch_size`.
        img_size: our `model.img_size`.

    Returns:
        A name from `TIMM_VITS`.

    Raises:
        ValueError: `arch` has no plain timm ViT.
    """
    entries = TIMM_VITS.get(arch)
    if not entries:
        raise ValueError(f"model.arch {arch!r} has no plain timm ViT; one of "
                         f"{sorted(a for a, e in TIMM_VITS.items() if e)}")
    p, s = min(entries, key=lambda e: (abs(e[0] - patch_size), abs(e[1] - img_size), e))
    return entries[p, s]


def timm_spec(model_cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(name, kwargs) with which `timm.create_model(name, pretrained=False, num_classes=0, **kwargs)` builds our
    backbone: a plain ViT (`timm_name`; registers as `reg_tokens` with `no_embed_class`) for learned positions,
    timm's DINOv3 port (`TIMM_DINOV3`, cls-token pooling) for RoPE.

    Raises:
        ValueError: naming the model.* field timm's classes cannot express (learned positions with SwiGLU or a norm
            eps other than 1e-6; RoPE with a norm eps other than 1e-5, or another FFN than that name's).
    """
    c = model_cfg
    kwargs: dict[str, Any] = {"img_size": c.img_size, "patch_size": c.patch_size}
    if c.pos_embed == "rope":
        if c.norm_eps != DINOV3_NORM_EPS:
            raise ValueError(f"model.norm_eps={c.norm_eps:g}: timm's DINOv3 models (RoPE) have LayerNorm eps 1e-5")
        want = "swiglu" if c.arch == "vit_small_plus" else "mlp"
        if c.ffn != want:
            raise ValueError(f"model.ffn={c.ffn} with model.arch={c.arch}: timm's DINOv3 {c.arch} uses {want}")
        kwargs.update(num_reg_tokens=c.num_register_tokens, global_pool="token", rope_temperature=c.rope_base)
        return TIMM_DINOV3[c.arch], kwargs
    if c.ffn != "mlp":
        raise ValueError(f"model.ffn={c.ffn} with learned positions: timm's ViT port of it is not supported")
    if c.norm_eps != DEFAULT_NORM_EPS:
        raise ValueError(f"model.norm_eps={c.norm_eps:g}: timm's ViT has LayerNorm eps 1e-6")
    if c.layerscale > 0:
        kwargs["init_values"] = c.layerscale
    if c.num_register_tokens:
        kwargs.update(reg_tokens=c.num_register_tokens, no_embed_class=True)
    return timm_name(c.arch, c.patch_size, c.img_size), kwargs


def _checked_backbone(backbone_state: dict[str, Tensor], model_cfg: ModelConfig) -> dict[str, Tensor]:
    fields = {k: getattr(model_cfg, k) for k in ("arch", "patch_size", "img_size", *BACKBONE_FIELDS)}
    expected = {k.removeprefix("backbone."): v.shape for k, v in _meta_network(fields).state_dict().items()
                if k.startswith("backbone.")}
    state = {k.removeprefix("backbone."): v for k, v in backbone_state.items()}
    problem = _mismatch(state, expected, optional=("mask_token",))
    if problem:
        raise ValueError(f"the backbone state does not fit model.arch={model_cfg.arch} with its options: {problem}")
    return state


def _zero_k_bias(state: dict[str, Tensor], depth: int, dim: int) -> None:
    for i in range(depth):
        bias = state[f"blocks.{i}.attn.qkv.bias"].clone()
        bias[dim : 2 * dim] = 0
        state[f"blocks.{i}.attn.qkv.bias"] = bias


def _gammas_of_one(state: dict[str, Tensor], depth: int, dim: int) -> None:
    """LayerScale gammas of 1 (the identity) for a backbone without LayerScale, in layouts that always have it."""
    like = state["cls_token"]
    for i in range(depth):
        for n in (1, 2):
            state.setdefault(f"blocks.{i}.ls{n}.gamma", torch.ones(dim, dtype=like.dtype))


def _to_timm(state: dict[str, Tensor], c: ModelConfig) -> dict[str, Tensor]:
    a = ARCHS[c.arch]
    state = {k: v for k, v in state.items() if k != "mask_token"}
    out: dict[str, Tensor] = {}
    if c.pos_embed == "rope":  # timm's Eva: gamma_1 / 2, q_bias / v_bias (no K bias), SwiGLU fc1_g / fc1_x / fc2
        k_bias = [state[f"blocks.{i}.attn.qkv.bias"][a.embed_dim : 2 * a.embed_dim] for i in range(a.depth)]
        if c.qkv_k_bias and any(bool(b.any()) for b in k_bias):
            raise ValueError("model.qkv_k_bias=true with a nonzero K bias: timm's DINOv3 models have no K bias")
        _gammas_of_one(state, a.depth, a.embed_dim)
        for k, v in state.items():
            if m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.bias", k):
                q, _, val = v.chunk(3)
                out[f"blocks.{m[1]}.attn.q_bias"], out[f"blocks.{m[1]}.attn.v_bias"] = q, val
                continue
            k = re.sub(r"^blocks\.(\d+)\.ls([12])\.gamma$", r"blocks.\1.gamma_\2", k)
            k = re.sub(r"\.mlp\.w1\.", ".mlp.fc1_g.", re.sub(r"\.mlp\.w2\.", ".mlp.fc1_x.", k))
            k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
            out[_to_official(k, "reg_token")] = v
        return out
    if not c.qkv_k_bias:
        _zero_k_bias(state, a.depth, a.embed_dim)
    if c.num_register_tokens:  # no_embed_class: the cls position goes into the cls token, as timm's DINOv2 port does
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    return {_to_official(k, "reg_token"): v for k, v in state.items()}


def to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our backbone's key names -> timm's `VisionTransformer` ones, in memory (the renames only: for a plain ViT the
    tensors are the same in both; files go through `write_released`)."""
    return {_to_official(k, "reg_token"): v for k, v in state.items()}


def from_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's `VisionTransformer` key names -> ours, in memory (the inverse of `to_timm`)."""
    return {_rename(k): v for k, v in state.items()}


def _to_official(key: str, registers: str) -> str:
    if key.startswith("patch_embed."):
        return key.replace("patch_embed.", "patch_embed.proj.", 1)
    return registers if key == "register_tokens" else key


def _to_dinov2(state: dict[str, Tensor], c: ModelConfig) -> dict[str, Tensor]:
    """DINOv2's hub layout (`_make_dinov2_model`, loaded strict=True): LayerScale and the mask token always there
    (gammas of 1 and the zero init when ours has none); the K bias written as zeros when ours masks it."""
    if c.pos_embed != "learned" or c.ffn != "mlp" or c.norm_eps != DEFAULT_NORM_EPS:
        raise ValueError("the dinov2 layout holds learned positions, a GELU MLP and LayerNorm eps 1e-6; this model "
                         f"has model.pos_embed={c.pos_embed}, model.ffn={c.ffn}, model.norm_eps={c.norm_eps:g} "
                         "(RoPE models: the dinov3 layout)")
    a = ARCHS[c.arch]
    state = dict(state)
    _gammas_of_one(state, a.depth, a.embed_dim)
    state.setdefault("mask_token", state["cls_token"].new_zeros(1, a.embed_dim))
    if not c.qkv_k_bias:
        _zero_k_bias(state, a.depth, a.embed_dim)
    return {_to_official(k, "register_tokens"): v for k, v in state.items()}


def _to_dinov3(state: dict[str, Tensor], c: ModelConfig) -> dict[str, Tensor]:
    """DINOv3's hub layout (`_make_dinov3_vit` with mask_k_bias, loaded strict=True): storage tokens, the RoPE
    periods and the qkv bias masks as buffers, LayerScale and the mask token always there."""
    if c.pos_embed != "rope" or c.norm_eps != DINOV3_NORM_EPS:
        raise ValueError(f"the dinov3 layout holds RoPE and LayerNorm eps 1e-5 (readers infer both from it); this "
                         f"model has model.pos_embed={c.pos_embed}, model.norm_eps={c.norm_eps:g} (learned "
                         "positions: the dinov2 layout)")
    a = ARCHS[c.arch]
    dim, head_dim = a.embed_dim, a.embed_dim // a.num_heads
    state = dict(state)
    _gammas_of_one(state, a.depth, dim)
    state.setdefault("mask_token", state["cls_token"].new_zeros(1, dim))
    mask = torch.ones(3 * dim, dtype=state["blocks.0.attn.qkv.bias"].dtype)
    if not c.qkv_k_bias:
        _zero_k_bias(state, a.depth, dim)
        mask[dim : 2 * dim] = 0
    out = {_to_official(k, "storage_tokens"): v for k, v in state.items()}
    for i in range(a.depth):
        out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    out["rope_embed.periods"] = c.rope_base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32)
                                                / (head_dim // 2))
    return out


def _structural_metadata(c: ModelConfig) -> dict[str, str]:
    fields = {k: getattr(c, k) for k in ("arch", "patch_size", "img_size", *BACKBONE_FIELDS)}
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}


def write_released(backbone_state: dict[str, Tensor], model_cfg: ModelConfig, out: str | Path, fmt: str,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write a backbone in a released layout that `read_released` reads back (and the layout's own loaders take).

    Args:
        backbone_state: `VisionTransformer` keys (a `backbone.` prefix is removed; mask_token optional).
        model_cfg: the ModelConfig the backbone was built from.
        out: the file (the folder for "hf") to write; written atomically.
        fmt: "ibot-engine" (safetensors, our keys, the structural fields in the metadata), "timm" (safetensors
            with metadata timm_name / timm_kwargs, see `timm_spec`), "dinov2" / "dinov3" (the official hub layouts,
            plain .pth state dicts: the official hub loaders read them with torch.load; the suffix of `out` is not
            changed) or "hf" (a transformers folder, `ibot_engine.model.hf_format.write_hf_folder`).
        metadata: extra string metadata (e.g. which backbone, the step) for the safetensors formats.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown format, a state that does not fit model_cfg, or a model the layout cannot hold
            (naming the model.* field).
    """
    from ibot_engine.checkpoint import atomic_write

    if fmt not in WRITE_FORMATS:
        raise ValueError(f"format {fmt!r}: one of {list(WRITE_FORMATS)}")
    out = Path(out)
    state = _checked_backbone(backbone_state, model_cfg)
    if fmt == "hf":
        from ibot_engine.model.hf_format import write_hf_folder

        return write_hf_folder(state, model_cfg, out)
    info = {**(metadata or {}), **_structural_metadata(model_cfg), "format": fmt}
    if fmt == "ibot-engine":
        tensors = state
    elif fmt == "timm":
        name, kwargs = timm_spec(model_cfg)
        tensors = _to_timm(state, model_cfg)
        info.update(timm_name=name, timm_kwargs=json.dumps(kwargs))
    elif fmt == "dinov2":
        tensors = _to_dinov2(state, model_cfg)
    else:
        tensors = _to_dinov3(state, model_cfg)
    # Compact, unshared CPU copies: safetensors refuses shared storage, and torch.save would write a view's whole
    # storage (a chunk of qkv, a mapped file).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("ibot-engine", "timm"):
        from safetensors.torch import save

        data = save(tensors, metadata=info)
        atomic_write(out, lambda f: f.write(data))
    else:
        atomic_write(out, lambda f: torch.save(tensors, f))
    return out
