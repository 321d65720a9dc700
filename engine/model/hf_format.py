"""Hugging Face transformers folders of DINOv2, DINOv2-with-registers and DINOv3 backbones, read and written.

A folder is `config.json` + `model.safetensors` (or shards listed in `model.safetensors.index.json`), as
`save_pretrained` writes it and the Hub serves it. transformers is not a dependency of the engine: the config is read
and written as JSON and the tensors with safetensors (never a pickle). `AutoModel.from_pretrained(folder)` builds
`Dinov2Model`, `Dinov2WithRegistersModel` or `DINOv3ViTModel` from what `write_hf_folder` writes, with no missing or
unexpected keys.

Key tables, ours <- the file's (D = hidden size; block keys after the prefixes blocks.i. <- encoder.layer.i. for
DINOv2, layer.i. for DINOv3; "a." = "attention."):

| ours                      | dinov2, dinov2_with_registers          | dinov3_vit                          |
|---------------------------|----------------------------------------|-------------------------------------|
| cls_token [1,1,D]         | embeddings.cls_token                   | embeddings.cls_token                |
| pos_embed [1,1+N,D]       | embeddings.position_embeddings         | (none: RoPE, computed)              |
| mask_token [1,D]          | embeddings.mask_token [1,D]            | embeddings.mask_token [1,1,D]       |
| register_tokens [1,R,D]   | embeddings.register_tokens (registers) | embeddings.register_tokens          |
| patch_embed.{weight,bias} | embeddings.patch_embeddings.projection | embeddings.patch_embeddings         |
| norm1, norm2              | norm1, norm2                           | norm1, norm2                        |
| attn.qkv.weight           | cat(a.attention.{query,key,value})     | cat(a.{q,k,v}_proj)                 |
| attn.qkv.bias             | cat(a.attention.{query,key,value})     | cat(a.q_proj, zeros, a.v_proj)      |
| attn.proj                 | a.output.dense                         | a.o_proj                            |
| ls1.gamma, ls2.gamma      | layer_scale1.lambda1, layer_scale2.*   | layer_scale1.lambda1, layer_scale2.*|
| mlp.fc1, mlp.fc2          | mlp.fc1, mlp.fc2                       | mlp.up_proj, mlp.down_proj          |
| mlp.w1, w2, w3 (SwiGLU)   | (use_swiglu_ffn, ViT-g: not supported) | mlp.gate_proj, up_proj, down_proj   |
| norm                      | layernorm                              | norm                                |

These are the names `save_pretrained` writes and the Hub files hold. transformers 5 renames some of them in memory
(`attention.q_proj`/`o_proj` for DINOv2, `model.layer.i` for DINOv3) and loads files in either spelling; both are
read here. A bias the config turns off (DINOv3 `key_bias=False`, `query_bias`, `proj_bias`, `mlp_bias`; DINOv2
`qkv_bias`) is absent from the file and reads as zeros in our always-biased Linear layers; the K bias off maps to
`qkv_k_bias=False`.

Semantics that differ from the official code or from timm (what a user of these folders should know):
- HF's DINOv3 stores the mask token as [1,1,D] (official [1,D]) and has no `bias_mask` / `rope_embeddings.periods`
  in the file (`inv_freq` = 1 / periods is a non-persistent buffer); its RoPE equals the official one at
  inference, and applies the coordinate rescale (`pos_embed_rescale`, default 2) in training mode only.
- HF always has LayerScale (`layerscale_value`, default 1.0): a model of ours without LayerScale is written with
  gammas of 1, which is the same function; it reads back as LayerScale with those gammas.
- HF's DINOv2 always has a mask token (the register variant cannot turn it off); a backbone of ours without one
  (a teacher) is written with the zero token the official init gives.
- Position-embedding resampling at other sizes: HF's `Dinov2Model` uses bicubic to the target size without
  antialias (the official non-register code uses a `scale_factor` with a +0.1 offset instead, so they differ);
  `Dinov2WithRegistersModel` uses bicubic with antialias, as the official register models do. PyTorch's
  antialiased bicubic uses a different kernel (a = -0.5) from the plain one (a = -0.75), so the two differ even
  when upsampling.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from ibot_engine.checkpoint import atomic_write
from ibot_engine.config import keys_message
from ibot_engine.model.vit import ARCHS, swiglu_hidden

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MODEL_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
                 "dinov3_vit": "DINOv3ViTModel"}

# The transformers 5 class defaults of the fields read here: a config.json (older Hub ones especially) may leave a
# field out, and transformers then uses its default.
_DINOV2_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 14,
                    "num_channels": 3, "qkv_bias": True, "layerscale_value": 1.0, "use_swiglu_ffn": False,
                    "use_mask_token": True}
_DEFAULTS = {
    "dinov2": _DINOV2_DEFAULTS,
    "dinov2_with_registers": {**_DINOV2_DEFAULTS, "patch_size": 16, "num_register_tokens": 4},
    "dinov3_vit": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-5, "rope_theta": 100.0, "image_size": 224,
                   "patch_size": 16, "num_channels": 3, "query_bias": True, "key_bias": False, "value_bias": True,
                   "proj_bias": True, "mlp_bias": True, "layerscale_value": 1.0, "use_gated_mlp": False,
                   "num_register_tokens": 0},
}
# transformers 5's in-memory names -> the file names above (from_pretrained accepts both spellings).
_ALIASES = {
    "dinov2": ((".attention.q_proj.", ".attention.attention.query."),
               (".attention.k_proj.", ".attention.attention.key."),
               (".attention.v_proj.", ".attention.attention.value."),
               (".attention.o_proj.", ".attention.output.dense.")),
    "dinov3_vit": (),
}
_ALIASES["dinov2_with_registers"] = _ALIASES["dinov2"]


@dataclass(frozen=True)
class _Layout:
    """What one HF backbone looks like, whichever side it comes from."""

    model_type: str
    depth: int
    registers: int
    biases: dict[str, bool]  # q, k, v, proj, mlp: present in the file
    ffn: str  # mlp | swiglu
    mask_token: bool


def _pairs(prefix: str, ours: str, theirs: str) -> dict[str, tuple[str, ...]]:
    return {f"{ours}.weight": (f"{prefix}{theirs}.weight",), f"{ours}.bias": (f"{prefix}{theirs}.bias",)}


def _table(layout: _Layout) -> dict[str, tuple[str | None, ...]]:
    """Our key -> the file keys it is made of, concatenated along dim 0; None: a bias absent from the file (zeros)."""
    t: dict[str, tuple[str | None, ...]] = {"cls_token": ("embeddings.cls_token",)}
    if layout.mask_token:
        t["mask_token"] = ("embeddings.mask_token",)
    if layout.registers or layout.model_type == "dinov3_vit":
        t["register_tokens"] = ("embeddings.register_tokens",)
    b = layout.biases
    if layout.model_type == "dinov3_vit":
        t.update(_pairs("", "patch_embed", "embeddings.patch_embeddings"))
        t.update(_pairs("", "norm", "norm"))
        block, attn = "layer.{i}.", "attention.{}_proj"
        qkv_names, proj = [attn.format(n) for n in "qkv"], attn.format("o")
        mlp = {"fc1": "up_proj", "fc2": "down_proj"} if layout.ffn == "mlp" else {
            "w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
    else:
        t["pos_embed"] = ("embeddings.position_embeddings",)
        t.update(_pairs("", "patch_embed", "embeddings.patch_embeddings.projection"))
        t.update(_pairs("", "norm", "layernorm"))
        block = "encoder.layer.{i}."
        qkv_names = [f"attention.attention.{n}" for n in ("query", "key", "value")]
        proj, mlp = "attention.output.dense", {"fc1": "fc1", "fc2": "fc2"}
    for i in range(layout.depth):
        p = block.format(i=i)
        for norm in ("norm1", "norm2"):
            t.update(_pairs(p, f"blocks.{i}.{norm}", norm))
        t[f"blocks.{i}.attn.qkv.weight"] = tuple(f"{p}{n}.weight" for n in qkv_names)
        t[f"blocks.{i}.attn.qkv.bias"] = tuple(f"{p}{n}.bias" if b[x] else None for n, x in zip(qkv_names, "qkv"))
        t[f"blocks.{i}.attn.proj.weight"] = (f"{p}{proj}.weight",)
        t[f"blocks.{i}.attn.proj.bias"] = (f"{p}{proj}.bias" if b["proj"] else None,)
        for ours, theirs in mlp.items():
            t[f"blocks.{i}.mlp.{ours}.weight"] = (f"{p}mlp.{theirs}.weight",)
            t[f"blocks.{i}.mlp.{ours}.bias"] = (f"{p}mlp.{theirs}.bias" if b["mlp"] else None,)
        t[f"blocks.{i}.ls1.gamma"] = (f"{p}layer_scale1.lambda1",)
        t[f"blocks.{i}.ls2.gamma"] = (f"{p}layer_scale2.lambda1",)
    return t


def _ffn_hidden(arch: str, ffn: str) -> int:
    """The feed-forward width of our `arch` with `ffn` (SwiGLU narrows the nominal dim * ratio to DINOv3's width)."""
    a = ARCHS[arch]
    hidden = int(a.embed_dim * a.mlp_ratio)
    return swiglu_hidden(hidden) if ffn == "swiglu" else hidden


def _arch_for(dim: int, depth: int, heads: int, ffn_hidden: int, ffn: str) -> str | None:
    for name, a in ARCHS.items():
        if (a.embed_dim, a.depth, a.num_heads, _ffn_hidden(name, ffn)) == (dim, depth, heads, ffn_hidden):
            return name
    return None


def _square(value: Any, what: str, folder: Path) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{folder / CONFIG_NAME}: {what}={value}: only square sizes are supported")
        value = value[0]
    return int(value)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: not a Hugging Face model folder (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(f'{k} ({v})' for k, v in MODEL_CLASSES.items())}")
    return {**_DEFAULTS[model_type], **config}


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's safetensors file(s), as stored (dtype kept)."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".h5", ".msgpack"))
        extra = f" (it holds {', '.join(found)}: only safetensors files are read, never pickles)" if found else ""
        raise ValueError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}{extra}")
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
    return tensors


def _canonical(key: str, model_type: str) -> str:
    if model_type == "dinov3_vit" and key.startswith("model.layer."):
        return key.removeprefix("model.")
    for memory, file in _ALIASES[model_type]:
        key = key.replace(memory, file)
    return key


def read_hf_folder(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a transformers DINOv2 / DINOv2-with-registers / DINOv3 ViT folder into our backbone's terms.

    Args:
        path: the folder holding config.json and model.safetensors (or a sharded index).

    Returns:
        The ModelConfig fields the folder fixes (arch, patch_size, img_size, layerscale, num_register_tokens,
        pos_embed, norm_eps, ffn, qkv_k_bias; rope_base for DINOv3), and the backbone state dict with
        `VisionTransformer` key names (mask_token when the file has one), tensors in the file's dtype.

    Raises:
        ValueError: naming the folder or file, for an unsupported model_type, a size that is none of our archs, a
            missing or unreadable file, or keys missing from / unknown to the layout.
    """
    folder = Path(path)
    config = _read_config(folder)
    model_type = config["model_type"]
    cfg_path = folder / CONFIG_NAME
    dim, depth, heads = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    patch = _square(config["patch_size"], "patch_size", folder)
    if int(config["num_channels"]) != 3:
        raise ValueError(f"{cfg_path}: num_channels={config['num_channels']}; our backbone takes RGB (3)")
    if model_type == "dinov3_vit":
        ffn = "swiglu" if config["use_gated_mlp"] else "mlp"
        mlp_hidden = int(config["intermediate_size"])
        biases = {"q": config["query_bias"], "k": config["key_bias"], "v": config["value_bias"],
                  "proj": config["proj_bias"], "mlp": config["mlp_bias"]}
        registers, mask_token = int(config["num_register_tokens"]), True
    else:
        if config["use_swiglu_ffn"]:
            raise ValueError(f"{cfg_path}: use_swiglu_ffn=true (DINOv2 ViT-g's fused SwiGLU) is not supported")
        ffn = "mlp"
        mlp_hidden = int(dim * config["mlp_ratio"])
        biases = {"q": config["qkv_bias"], "k": config["qkv_bias"], "v": config["qkv_bias"], "proj": True, "mlp": True}
        registers = int(config["num_register_tokens"]) if model_type == "dinov2_with_registers" else 0
        mask_token = model_type == "dinov2_with_registers" or bool(config["use_mask_token"])
    expected_act = "silu" if ffn == "swiglu" else "gelu"
    if config["hidden_act"] != expected_act:
        raise ValueError(f"{cfg_path}: hidden_act={config['hidden_act']!r}; our {ffn} uses {expected_act!r}")
    arch = _arch_for(dim, depth, heads, mlp_hidden, ffn)
    if arch is None:
        known = "; ".join(f"{n}: {a.embed_dim}/{a.depth}/{a.num_heads}" for n, a in ARCHS.items())
        raise ValueError(f"{cfg_path}: hidden_size {dim}, {depth} layers, {heads} heads, {ffn} hidden {mlp_hidden} "
                         f"is none of our archs (hidden/layers/heads: {known})")
    layout = _Layout(model_type, depth, registers, biases, ffn, mask_token)
    table = _table(layout)

    tensors = {_canonical(k, model_type): v for k, v in _read_tensors(folder).items()}
    wanted = {name for names in table.values() for name in names if name is not None}
    missing = sorted(wanted - tensors.keys())
    unknown = sorted(tensors.keys() - wanted)
    if missing or unknown:
        parts = [f"missing keys: {keys_message(missing)}"] if missing else []
        parts += [f"unknown keys: {keys_message(unknown)}"] if unknown else []
        raise ValueError(f"{folder}: not a {MODEL_CLASSES[model_type]} of config.json's sizes; {'; '.join(parts)}")

    state: dict[str, Tensor] = {}
    for ours, names in table.items():  # a weight comes before its bias
        if None in names:  # a bias the config turns off: zeros, as wide as the weight's rows (q, k, v: D each)
            weight = state[ours.removesuffix("bias") + "weight"]
            zeros = weight.new_zeros(weight.shape[0] // len(names))
            parts = [zeros if n is None else tensors.pop(n) for n in names]
        else:  # popped as they are used: the file's tensors are held once, plus one fused qkv at a time
            parts = [tensors.pop(n) for n in names]
        state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    if model_type == "dinov3_vit":
        state["mask_token"] = state["mask_token"].reshape(1, dim)
        if registers == 0:
            del state["register_tokens"]

    if model_type == "dinov3_vit":  # no stored grid: the config's image size is the native one
        img_size = _square(config["image_size"], "image_size", folder)
        positions: dict[str, Any] = {"pos_embed": "rope", "rope_base": float(config["rope_theta"])}
    else:
        n = state["pos_embed"].shape[1] - 1
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"{folder}: embeddings.position_embeddings holds {n} patch positions, not a square grid")
        img_size, positions = grid * patch, {"pos_embed": "learned"}
    fields = {
        "arch": arch, "patch_size": patch, "img_size": img_size,
        # LayerScale's init value; HF always has LayerScale, and 0 would mean "none" to our config.
        "layerscale": float(config["layerscale_value"]) or 1.0,
        "num_register_tokens": registers, "norm_eps": float(config["layer_norm_eps"]), "ffn": ffn,
        "qkv_k_bias": bool(biases["k"]), **positions,
    }
    return fields, state


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_hf_folder(backbone_state: dict[str, Tensor], model_cfg, out: Path) -> Path:
    """Write our backbone as a transformers folder (config.json + model.safetensors) that `read_hf_folder` reads back.

    The model type follows the backbone: RoPE -> dinov3_vit (DINOv3ViTModel); learned positions with register
    tokens -> dinov2_with_registers; else dinov2. `AutoModel.from_pretrained(out)` loads it with no missing or
    unexpected keys and gives our backbone's tokens.

    Args:
        backbone_state: `VisionTransformer.state_dict()` keys (mask_token optional).
        model_cfg: the ModelConfig the backbone was built from (arch, patch_size, img_size, layerscale,
            num_register_tokens, pos_embed, rope_base, norm_eps, ffn, qkv_k_bias).
        out: the folder to write (created; its config.json and model.safetensors are replaced).

    Returns:
        out.

    Raises:
        ValueError: a backbone HF's classes cannot hold (learned positions with SwiGLU), or a state whose keys do
            not match model_cfg.
    """
    out = Path(out)
    a = ARCHS[model_cfg.arch]
    dim, rope, ffn = a.embed_dim, model_cfg.pos_embed == "rope", model_cfg.ffn
    registers = model_cfg.num_register_tokens
    if not rope and ffn != "mlp":
        raise ValueError(f"model.ffn={ffn!r} with learned positions: HF's Dinov2 SwiGLU (ViT-g's fused form) has "
                         "another hidden size; only DINOv3 (model.pos_embed=rope) folders take SwiGLU")
    model_type = "dinov3_vit" if rope else "dinov2_with_registers" if registers else "dinov2"
    k_bias = bool(model_cfg.qkv_k_bias) or not rope  # Dinov2 always has a K bias: written as its zeros
    biases = {"q": True, "k": k_bias, "v": True, "proj": True, "mlp": True}
    mlp_hidden = _ffn_hidden(model_cfg.arch, ffn)
    layout = _Layout(model_type, a.depth, registers, biases, ffn, mask_token=True)
    table = _table(layout)

    state = dict(backbone_state)
    first = next(iter(state.values()))
    if model_cfg.layerscale <= 0:  # HF always scales: gammas of 1 are the identity
        for i in range(a.depth):
            state[f"blocks.{i}.ls1.gamma"] = state[f"blocks.{i}.ls2.gamma"] = torch.ones(dim, dtype=first.dtype)
    if "mask_token" not in state:  # a teacher backbone: the official (and HF) init, zeros
        state["mask_token"] = torch.zeros(1, dim, dtype=first.dtype)
    if rope:
        state["mask_token"] = state["mask_token"].reshape(1, 1, dim)
        if registers == 0:  # DINOv3ViTModel keeps an empty [1, 0, D] parameter
            state["register_tokens"] = torch.zeros(1, 0, dim, dtype=first.dtype)
    if not model_cfg.qkv_k_bias:  # the K third of the bias is masked to zero in our model
        for i in range(a.depth):
            bias = state[f"blocks.{i}.attn.qkv.bias"].clone()
            bias[dim:2 * dim] = 0
            state[f"blocks.{i}.attn.qkv.bias"] = bias
    missing, unknown = sorted(table.keys() - state.keys()), sorted(state.keys() - table.keys())
    if missing or unknown:
        parts = [f"missing keys: {keys_message(missing)}"] if missing else []
        parts += [f"unknown keys: {keys_message(unknown)}"] if unknown else []
        raise ValueError(f"backbone state does not match model.arch={model_cfg.arch} and its options; "
                         f"{'; '.join(parts)}")

    tensors: dict[str, Tensor] = {}
    for ours, names in table.items():
        # clone: safetensors refuses tensors that share storage, which chunks of one qkv tensor do.
        for name, part in zip(names, state[ours].chunk(len(names)), strict=True):
            if name is not None:
                tensors[name] = part.detach().to("cpu", copy=True).contiguous()

    config: dict[str, Any] = {
        "model_type": model_type, "architectures": [MODEL_CLASSES[model_type]],
        "hidden_size": dim, "num_hidden_layers": a.depth, "num_attention_heads": a.num_heads,
        "hidden_act": "silu" if ffn == "swiglu" else "gelu", "layer_norm_eps": float(model_cfg.norm_eps),
        "patch_size": model_cfg.patch_size, "num_channels": 3,
        "layerscale_value": float(model_cfg.layerscale) if model_cfg.layerscale > 0 else 1.0,
        "drop_path_rate": 0.0, "dtype": _dtype_name(first.dtype),
    }
    if rope:
        config.update(image_size=model_cfg.img_size, intermediate_size=mlp_hidden,
                      rope_theta=float(model_cfg.rope_base), query_bias=True, key_bias=k_bias, value_bias=True,
                      proj_bias=True, mlp_bias=True, use_gated_mlp=ffn == "swiglu", num_register_tokens=registers)
    else:
        n = state["pos_embed"].shape[1] - 1
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
        # Dinov2Config types mlp_ratio as int; our archs' ratios (4, 6) are whole numbers.
        config.update(image_size=grid * model_cfg.patch_size, mlp_ratio=int(a.mlp_ratio), qkv_bias=True,
                      use_swiglu_ffn=False)
        if registers:
            config["num_register_tokens"] = registers
        else:
            config["use_mask_token"] = True
    out.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"format": "pt"})
    atomic_write(out / WEIGHTS_NAME, lambda f: f.write(data))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(out / CONFIG_NAME, lambda f: f.write(text.encode()))
    return out
