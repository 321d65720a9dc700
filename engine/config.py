"""Typed configuration: dataclass defaults < YAML preset < dotted command-line overrides.

`load_config(path, overrides)` returns a `Config`; an unknown key or a value of the wrong type raises
`ConfigError` naming the key (and the closest valid key). Values in overrides are coerced to the declared
type of their field, not parsed as YAML (PyYAML reads `1e-4` as a string). The resolved config is written to
the run directory by the trainer (`save_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def keys_message(keys: Iterable[str], limit: int = 8) -> str:
    """The keys an error message names (of a file, a state dict, a config): sorted, the first `limit`, and how many
    in all when there are more."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


@dataclass(kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/ibot"
    """Run directory: resolved config, metrics.jsonl, checkpoints, plots."""
    tensorboard: bool = False
    """Also write the logged metrics as TensorBoard scalars to <run.dir>/tensorboard (needs the tensorboard
    package: pip install 'ibot-engine[tensorboard]')."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 0
    """Optimizer steps to run. 0 means `train.epochs` epochs of the dataset."""
    epochs: float = 100.0
    """Used only when `train.steps` is 0: the run length in epochs of the dataset."""
    schedule_unit: Literal["epochs", "run"] = "epochs"
    """Unit of the warm-up lengths `optim.warmup_epochs`, `optim.freeze_last_layer_epochs` and
    `loss.warmup_teacher_temp_epochs`: epochs of the data set (official), or run: fractions in [0, 1] of the run's
    steps (0.1: the first 10%), so that one recipe holds at any data set size and run length. run needs
    `loss.teacher_temp_per_step=true`: the official temperature staircase moves once per epoch, and a fraction of a
    short run rounds to a warm-up of 0 or 1 whole epochs."""
    batch_size: int = 64
    """Images per GPU (per process)."""
    log_every: int = 10
    """Log (and read back losses from the device) every this many steps."""
    seed: int = 0
    """Seeds the model init, the augmentations (per sample) and the masks."""
    compile: bool = False
    """torch.compile each transformer block (regional compile, after activation checkpointing and before the
    DDP / FSDP2 wrap, as torchtitan orders it)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of the blocks; reduce-overhead replays each block as a CUDA graph (fewer launches)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Student blocks: full recomputes each block in the backward (least memory); selective keeps matmul and
    attention outputs and recomputes the elementwise ops (LayerNorm, GELU, residuals); none keeps everything."""
    on_collapse: Literal["warn", "stop"] = "warn"
    """What the collapse detector (engine/train/health.py) does when the teacher's targets stay near uniform or one-hot,
    or the cls embeddings of the batch become nearly identical, for several logging steps: warn once, or stop."""
    accum_steps: int = 1
    """Gradient accumulation: micro-batches of `batch_size` per optimizer step, exactly one step on their
    concatenation (engine/train/step.py says where it cannot be exact). The global batch, which sets the learning
    rate and the steps per epoch, is batch_size x world size x accum_steps."""
    on_nonfinite: Literal["rollback", "stop"] = "rollback"
    """A non-finite loss (seen at the next logging or checkpoint step, on any rank): rollback restores the last
    good checkpoint on every rank, skips the batches that led to the failure and goes on; stop ends the run. Either
    way no checkpoint of a non-finite state is written. fp16 GradScaler overflow skips are not failures."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one run before a further non-finite loss stops it."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (slower; bit-reproducible kernels where they exist)."""
    freeze_backbone_steps: int = 0
    """Under `model.init_from` with a file that has no heads: for this many first steps the student backbone gets
    no update (its gradients are dropped before clipping, so AdamW neither moves it nor starts its moments) while
    the fresh heads warm up on the loaded features; ignored, and said once in the log, when the heads come from the
    file or the run starts from scratch. Continuation default: CONTINUE_DEFAULTS (20)."""
    unfreeze_warmup_steps: int = 0
    """After `freeze_backbone_steps`, the student backbone's lr ramps linearly from 1 / (N + 1) to 1 of the scheduled
    lr over these N steps; the heads keep the scheduled lr. Its AdamW state starts at the unfreeze, and a fresh
    Adam step moves every weight by about the lr whatever its gradient, so at the full lr the first unfrozen steps
    move the loaded backbone most, before its moments settle. Ignored with the freeze (loaded heads, from scratch).
    Continuation default: CONTINUE_DEFAULTS (20; measured in docs/continue.md, "Changing resolution")."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_small_plus"] = "vit_small"
    """Backbone size. vit_small_plus is DINOv3's ViT-S+ (ViT-S widths, feed-forward ratio 6; use with
    `model.ffn=swiglu` as DINOv3 does)."""
    patch_size: int = 16
    """Patch size in pixels (16 and 14 are the usual ones)."""
    img_size: int = 224
    """Resolution the position embeddings are stored at; other sizes interpolate them (cached weights)."""
    drop_path: float = 0.1
    """Student stochastic depth at the last block, linear from 0 at the first (official: 0.1)."""
    drop_path_uniform: bool = False
    """Use the `drop_path` rate in every block instead of the linear ramp (DINOv2's option, lightly's example)."""
    layerscale: float = 0.0
    """LayerScale init value; 0 disables LayerScale (official iBOT has none; DINOv2 uses 1e-5)."""
    init: Literal["trunc_normal", "xavier"] = "trunc_normal"
    """Backbone weight init: trunc_normal (official iBOT / DINO / timm: Linear N(0, 0.02)) or xavier (the MAE init
    lightly's iBOT uses; learns much faster in short runs from scratch)."""
    out_dim: int = 8192
    """K, the number of prototypes of the projection head."""
    teacher_head: Literal["copy", "independent"] = "copy"
    """How the teacher's head starts: copy: the student's (official iBOT, DINOv2); independent: its own draw of the
    same init (lightly's example). The backbone is always copied. With a copy, student and teacher start as one
    network and the first cls targets are sharp (H/ln K 0.5-0.7 after 10 steps on digits at 64 px); with an
    independent head they stay near uniform, as in lightly's example (docs/learning.md)."""
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = False
    """Freeze the weight-norm gain of the head's last layer at 1 (official: False for ViT-S, True for ViT-B)."""
    attention: Literal["sdpa", "xformers", "flex"] = "sdpa"
    """Attention kernel: sdpa (PyTorch picks cuDNN / Flash / memory-efficient), xformers (optional extra, CUDA
    only), flex (FlexAttention, compiled on CUDA; no CPU backward). See engine/model/attention.py."""
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    """attention=sdpa: force one SDPA kernel (experiments); auto lets PyTorch choose per call."""
    pack_crops: bool = False
    """Student: run global and local crops through the blocks as one packed token sequence (one launch per
    token-wise op instead of one per resolution); attention stays within each crop."""
    drop_path_impl: Literal["mask", "subset"] = "mask"
    """mask: the official per-sample Bernoulli mask on the residual branch; subset: compute the branch only for a
    fixed-size random subset of samples, scaled up (DINOv2's efficient form; not with pack_crops)."""
    norm_impl: Literal["torch", "apex"] = "torch"
    """LayerNorm kernel: torch, or NVIDIA apex's FusedLayerNorm when apex is installed (else torch, said once)."""
    num_register_tokens: int = 0
    """Register tokens (DINOv2 `*_reg`: 4) or storage tokens (DINOv3: 4): learned tokens after the cls token that get
    no position; tokens are [cls, registers, patches]. 0: none (iBOT, DINO, DINOv2)."""
    pos_embed: Literal["learned", "rope"] = "learned"
    """Position encoding: learned (an absolute embedding, bicubic-resampled for other grids; iBOT, DINO, DINOv2) or
    rope (DINOv3's rotary embedding of the patch tokens' coordinates, normalised to [-1, 1] per axis; no weights,
    any grid)."""
    rope_base: float = 100.0
    """pos_embed=rope: the base of the RoPE periods, base ** (4 i / head_dim) (DINOv3: 100)."""
    norm_eps: float = 1e-6
    """eps of every LayerNorm of the backbone (iBOT, DINO, DINOv2: 1e-6; DINOv3: 1e-5)."""
    ffn: Literal["mlp", "swiglu"] = "mlp"
    """Feed-forward of each block: mlp (GELU; keys mlp.fc1 / fc2) or swiglu (DINOv3's SwiGLUFFN, keys mlp.w1 / w2 /
    w3, width 2/3 of embed_dim x the arch's ratio rounded up to a multiple of 8; DINOv3 S+ and H+)."""
    qkv_k_bias: bool = True
    """false: the K third of the qkv bias is held at zero in the forward (DINOv3's mask_k_bias); the stored bias keeps
    its shape."""
    init_from: str = ""
    """Start the run from released weights: a DINO / iBOT / DINOv2 / DINOv3 / timm checkpoint file, a Hugging Face
    folder (config.json + model.safetensors) or one of our exports; empty: from scratch. A resumed checkpoint wins."""
    init_format: Literal["auto", "ibot", "dino", "dinov2", "dinov3", "timm", "hf", "ibot-engine"] = "auto"
    """Layout of `model.init_from`; auto: detected from its keys and metadata."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = "builtin:patterns"
    """Image folder (class sub-folders or a flat folder of images), or a built-in labelled dataset for demos and
    tests: `builtin:digits` (scikit-learn's scans of handwritten digits, the demo's), or the generated
    `builtin:patterns` (the default, for quick runs and tests) and `builtin:shapes`."""
    global_size: int = 224
    local_size: int = 0
    """Side of the local crops in pixels; 0: 96 rounded to the nearest multiple of model.patch_size (96 at 8 and 16,
    98 at 14), resolved by load_config."""
    num_global: int = 2
    num_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    """Area fraction range of the local crops (official: 0.05-0.25). [0, 0]: auto, resolved by load_config to
    (0.8 r2, min(1, 2 r2)) with r2 = (local_size / global_size) ** 2, rounded to 4 decimals (64 / 32 px: 0.2-0.5;
    224 / 96 px: 0.1469-0.3673): r2 is the area at which a local crop shows the image at the pixel density of a
    full-image global crop, and much smaller crops only upsample a few source pixels into a featureless blob."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 loads in the training process)."""
    builtin_size: int = 2000
    """Number of training images of a built-in dataset (its val split has a quarter as many, at least 100)."""
    shards: str = ""
    """WebDataset shards to train from instead of `path`: a folder with manifest.json (`ibot shards write`), a brace
    pattern (/data/train-{000000..001023}.tar) or any URL webdataset opens. `pipe:CMD` runs CMD in a shell."""
    shard_mode: Literal["exact", "resampled"] = "exact"
    """exact: each epoch reads every shard once, split over ranks and workers (resumes losing nothing);
    resampled: workers draw shards with replacement, an endless stream cut into epochs of `epoch_samples`."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer (0 or 1: shard order only)."""
    epoch_samples: int = 0
    """Samples per epoch; 0: the manifest's total (needed when the shards have no manifest)."""
    color_jitter_prob: float = 0.8
    """Probability of the colour jitter (brightness, contrast, saturation, hue) per view (official: 0.8)."""
    grayscale_prob: float = 0.2
    """Probability of turning a view grey (official: 0.2)."""
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)
    """Probability of the Gaussian blur on global view 1, global view 2 and the local views (official)."""
    solarize_prob: float = 0.2
    """Probability of solarizing global view 2 (official: 0.2)."""
    augment: Literal["cpu", "gpu"] = "cpu"
    """cpu: the recipe on uint8 arrays in the workers (engine/data/cpu_aug.py: OpenCV and torch kernels, ~3x the
    official PIL transforms per core); gpu: batched crops and colour ops on the training device
    (engine/data/augment.py), the workers only read the images and draw the views' parameters. Both serve image
    folders, built-in data and shards."""
    decode: Literal["gpu", "cpu"] = "gpu"
    """Shards with augment=gpu: gpu decodes the JPEG bytes on the device (nvJPEG); cpu decodes to uint8 in the
    workers. Image folders and built-in data are always decoded in the workers."""


@dataclass(kw_only=True, slots=True)
class MaskConfig:
    variant: Literal["official", "dinov2"] = "official"
    """official: per global crop, masked with `probability`, ratio U(ratio_min, ratio_max), BEiT block generator.
    dinov2: exactly int(probability * crops) crops of the batch masked, ratios stratified over the range."""
    probability: float = 0.5
    ratio_min: float = 0.1
    ratio_max: float = 0.5
    min_block_patches: int = 0
    """Smallest block in patches; 0 means (min(h, w) // 3) ** 2 (16 at 14x14) for official, 4 for dinov2."""
    aspect_min: float = 0.3
    """Block aspect ratio is log-uniform in (aspect_min, 1 / aspect_min)."""


@dataclass(kw_only=True, slots=True)
class LossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    patch_teacher_temp: float = 0.07
    warmup_patch_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    """Teacher temperature warm-up from the warmup_* values, in epochs (or a fraction of the run:
    `train.schedule_unit`)."""
    teacher_temp_per_step: bool = False
    """False: the official per-epoch linspace; True: per-step linear warm-up (DINOv2, lightly)."""
    lambda_cls: float = 1.0
    lambda_patch: float = 1.0
    center_momentum: float = 0.9
    centering: Literal["center", "sinkhorn"] = "center"
    """center: EMA centres (official iBOT); sinkhorn: Sinkhorn-Knopp teacher targets (DINOv2), no centre."""
    koleo_weight: float = 0.0
    """Weight of the KoLeo regulariser on the student's global cls tokens (DINOv2 uses 0.1; 0 disables it). It spreads
    the embeddings of a batch apart, a guard against the collapse of every image onto one embedding; nearest
    neighbours are searched over the global batch (all ranks)."""
    patch_center: Literal["all", "masked"] = "all"
    """all: the patch centre averages every teacher patch token (official iBOT); masked: only masked tokens
    (DINOv2, lightly), which lets the teacher head run on masked tokens only."""
    center_init: Literal["auto", "zero", "first_batch"] = "auto"
    """How the centres start (loss.centering=center). zero: at zero (official iBOT), or at the file's centres when
    `model.init_from` holds them; first_batch: at the teacher's mean cls / patch logits of the first batch (over
    every rank), set before the first loss, so that centring a loaded teacher does not shift its first targets;
    auto: first_batch when `model.init_from` is set and its file has no centres, else zero."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 5e-4
    """Base learning rate for a total batch of 256; the peak is lr * total_batch / 256. Continuation default
    (`model.init_from`): CONTINUE_DEFAULTS (1e-4)."""
    min_lr: float = 1e-6
    """The lr the cosine ends at, as is (not scaled by the batch) unless `optim.scale_min_lr`."""
    scale_min_lr: bool = False
    """Read `optim.min_lr` per 256 images like `optim.lr` (min_lr * total_batch / 256), so that lr = min_lr is a
    constant lr at any batch size."""
    warmup_epochs: float = 10.0
    """Linear lr warm-up from 0, in epochs (or a fraction of the run: `train.schedule_unit`)."""
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    decay_all: bool = False
    """Weight-decay every parameter (lightly's example); false: the official grouping, biases and 1-D parameters
    (norms, LayerScale) undecayed."""
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0
    """Gradient clipping threshold; 0 disables clipping."""
    clip_mode: Literal["global", "per_param"] = "global"
    """global: one norm over all gradients (DINOv2, lightly); per_param: each tensor on its own (official)."""
    freeze_last_layer_epochs: float = 1.0
    """Drop the head's last-layer gradients during this many first epochs (or this fraction of the run:
    `train.schedule_unit`)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay (DINOv2, BEiT): a parameter of layer l gets lr x layer_decay ** (depth + 1 - l), where the
    patch embedding, cls / register / mask tokens and position embedding are layer 0, block i is layer i + 1, and
    the final norm and the head are layer depth + 1 (full lr). 1.0: every layer at the same lr. Continuation
    default: CONTINUE_DEFAULTS (0.9, DINOv2's `layerwise_decay`)."""
    patch_embed_lr_mult: float = 1.0
    """Extra lr factor of the patch embedding, on top of its layer decay (DINOv2: 0.2). Continuation default:
    CONTINUE_DEFAULTS (0.2)."""
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    impl: Literal["torch", "apex"] = "torch"
    """torch: fused AdamW; apex: NVIDIA apex FusedAdam (adam_w_mode) when apex is installed (else torch, said once).
    The PyPI package named `apex` is an unrelated web toolkit: it is detected and ignored."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end of the run)."""
    resume: str = "auto"
    """auto: resume from the latest checkpoint in run.dir if there is one; '' or none: start fresh; a path."""
    keep: int = 3
    """Keep this many most recent checkpoints."""
    async_save: bool = False
    """Write checkpoints in a background thread (torch.distributed.checkpoint.async_save) after staging them on the
    CPU; training continues meanwhile, and the `latest` pointer moves only once the save is complete."""


@dataclass(kw_only=True, slots=True)
class DistributedConfig:
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    """none: one process; ddp: DistributedDataParallel; fsdp: FSDP2 fully_shard per block, head and root."""
    reshard_after_forward: bool = True
    """fsdp: free the gathered student parameters after the forward (ZeRO-3); false keeps them until the backward
    (ZeRO-2 like: less communication, more memory). The teacher always reshards."""
    bucket_cap_mb: float = 25.0
    """ddp: gradient all-reduce bucket size in MB."""
    static_graph: bool = True
    """ddp: the same parameters take part in every step, so DDP can skip its per-step graph bookkeeping."""
    log_all_ranks: bool = False
    """Every rank also writes its logged (rank-reduced) metrics to metrics.rank<R>.jsonl (launcher checks)."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    knn_every: int = 0
    """Weighted k-NN of the teacher on a held-out set every this many steps and at the last step (0: never);
    logs knn_top1 / knn_top5 (eval.features) and knn_clspatch_top1 / _top5 to metrics.jsonl, and at step 0 the
    baselines: random features (knn_random_*, knn_random_clspatch_*) and raw pixels (knn_pixels_*)."""
    train: str = ""
    """Labelled image folder or shards for the k-NN memory; empty: builtin:NAME:train for built-in data."""
    val: str = ""
    """Labelled image folder or shards to classify; empty: builtin:NAME:val for built-in data."""
    k: int = 20
    temperature: float = 0.07
    features: Literal["cls", "cls+patch"] = "cls"
    """cls: the cls token; cls+patch: cls token and mean patch token concatenated (then L2-normalised)."""
    batch_size: int = 128
    num_workers: int = 0
    """DataLoader worker processes of the k-NN feature extraction (0: in the training process)."""


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU. Loss and centring math are fp32 in every mode."""


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a command-line string) to the declared type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value.lower() in ("none", "null") and "none" in choices:
            value = "none"
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin in (types.UnionType, typing.Union):
        raise AssertionError(f"unsupported config type {tp} for {key}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values like [a, b], got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool | int | float | str):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp} for {key}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _set(cfg: Config, key: str, value: Any) -> None:
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        types_ = _field_types(type(obj))
        if part not in types_:
            raise _unknown_key(key)
        tp = types_[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
                for sub_key, sub_value in value.items():
                    _set(cfg, f"{key}.{sub_key}", sub_value)
                return
            obj = getattr(obj, part)
        elif last:
            setattr(obj, part, _coerce(key, value, tp))
        else:
            raise _unknown_key(key)


def _check(cfg: Config) -> None:
    """Cross-field validation; each error names its key. Resolves the automatic values (data.local_size 0,
    data.local_scale [0, 0])."""

    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    positive("train.steps", cfg.train.steps, allow_zero=True)
    if cfg.train.steps == 0:
        positive("train.epochs", cfg.train.epochs)
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.seed", cfg.train.seed, allow_zero=True)
    positive("train.log_every", cfg.train.log_every)
    positive("train.max_rollbacks", cfg.train.max_rollbacks, allow_zero=True)
    positive("train.accum_steps", cfg.train.accum_steps)
    positive("model.patch_size", cfg.model.patch_size)
    positive("model.out_dim", cfg.model.out_dim)
    positive("model.num_register_tokens", cfg.model.num_register_tokens, allow_zero=True)
    positive("model.rope_base", cfg.model.rope_base)
    positive("model.norm_eps", cfg.model.norm_eps)
    positive("data.local_size", cfg.data.local_size, allow_zero=True)
    if cfg.data.local_size == 0:  # auto: the usual 96 px, on the patch grid (DINOv2 uses 98 at patch 14)
        cfg.data.local_size = max(1, round(96 / cfg.model.patch_size)) * cfg.model.patch_size
    positive("data.global_size", cfg.data.global_size)
    if cfg.data.local_scale == (0, 0):  # auto: around the area of equal pixel density (DataConfig.local_scale)
        r2 = (cfg.data.local_size / cfg.data.global_size) ** 2
        # min clamped too: a local crop larger than the global one gets the whole image
        cfg.data.local_scale = (round(min(1.0, 0.8 * r2), 4), round(min(1.0, 2.0 * r2), 4))
    for key in ("data.global_size", "data.local_size", "model.img_size"):
        size = cfg.data.global_size if key == "data.global_size" else (
            cfg.data.local_size if key == "data.local_size" else cfg.model.img_size)
        if size % cfg.model.patch_size:
            raise ConfigError(f"config key '{key}' = {size} is not a multiple of model.patch_size = "
                              f"{cfg.model.patch_size}")
    if cfg.data.num_global < 2:
        raise ConfigError(f"config key 'data.num_global' must be >= 2 (cross-view pairs), got {cfg.data.num_global}")
    positive("data.num_local", cfg.data.num_local, allow_zero=True)
    positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    positive("data.shuffle_buffer", cfg.data.shuffle_buffer, allow_zero=True)
    positive("data.epoch_samples", cfg.data.epoch_samples, allow_zero=True)
    for key, (lo, hi) in (("data.global_scale", cfg.data.global_scale), ("data.local_scale", cfg.data.local_scale)):
        if not 0 < lo <= hi <= 1:
            auto = " ([0, 0]: auto from the crop sizes)" if key == "data.local_scale" else ""
            raise ConfigError(f"config key '{key}' must satisfy 0 < min <= max <= 1{auto}, got {(lo, hi)}")
    probs = {"data.color_jitter_prob": cfg.data.color_jitter_prob, "data.grayscale_prob": cfg.data.grayscale_prob,
             "data.solarize_prob": cfg.data.solarize_prob,
             **{f"data.blur_prob[{i}]": p for i, p in enumerate(cfg.data.blur_prob)}}
    for key, p in probs.items():
        if not 0 <= p <= 1:
            raise ConfigError(f"config key '{key}' is a probability in [0, 1], got {p}")
    if not 0 <= cfg.mask.probability <= 1:
        raise ConfigError(f"config key 'mask.probability' must be in [0, 1], got {cfg.mask.probability}")
    if not 0 <= cfg.mask.ratio_min <= cfg.mask.ratio_max < 1:
        raise ConfigError(
            f"config keys 'mask.ratio_min' / 'mask.ratio_max' must satisfy 0 <= min <= max < 1, "
            f"got {cfg.mask.ratio_min} / {cfg.mask.ratio_max}"
        )
    if not 0 < cfg.mask.aspect_min <= 1:
        raise ConfigError(f"config key 'mask.aspect_min' must be in (0, 1], got {cfg.mask.aspect_min}")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp", "patch_teacher_temp",
                "warmup_patch_teacher_temp"):
        positive(f"loss.{key}", getattr(cfg.loss, key))
    if not 0 <= cfg.loss.center_momentum < 1:
        raise ConfigError(f"config key 'loss.center_momentum' must be in [0, 1), got {cfg.loss.center_momentum}")
    positive("optim.lr", cfg.optim.lr)
    positive("optim.clip_grad", cfg.optim.clip_grad, allow_zero=True)
    positive("optim.layer_decay", cfg.optim.layer_decay)
    positive("optim.patch_embed_lr_mult", cfg.optim.patch_embed_lr_mult, allow_zero=True)
    positive("train.freeze_backbone_steps", cfg.train.freeze_backbone_steps, allow_zero=True)
    positive("train.unfreeze_warmup_steps", cfg.train.unfreeze_warmup_steps, allow_zero=True)
    if cfg.train.schedule_unit == "run":
        for key in ("optim.warmup_epochs", "optim.freeze_last_layer_epochs", "loss.warmup_teacher_temp_epochs"):
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if not 0 <= value <= 1:
                raise ConfigError(f"config key '{key}' is a fraction of the run in [0, 1] under "
                                  f"train.schedule_unit=run, got {value}")
        if not cfg.loss.teacher_temp_per_step:
            raise ConfigError("config key 'train.schedule_unit' = run needs loss.teacher_temp_per_step=true (the "
                              "per-epoch temperature staircase has no fraction-of-the-run form)")
    if not 0 <= cfg.optim.momentum_teacher <= cfg.optim.momentum_teacher_end <= 1:
        raise ConfigError(
            "config keys 'optim.momentum_teacher' <= 'optim.momentum_teacher_end' must lie in [0, 1], got "
            f"{cfg.optim.momentum_teacher} / {cfg.optim.momentum_teacher_end}"
        )
    positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    positive("eval.knn_every", cfg.eval.knn_every, allow_zero=True)
    positive("eval.k", cfg.eval.k)
    positive("eval.temperature", cfg.eval.temperature)
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("eval.num_workers", cfg.eval.num_workers, allow_zero=True)
    builtin = cfg.data.path.startswith("builtin:") and not cfg.data.shards.strip()
    if cfg.eval.knn_every and not builtin and not (cfg.eval.train and cfg.eval.val):
        raise ConfigError("config keys 'eval.train' and 'eval.val' (labelled folders or shards) are needed for "
                          f"eval.knn_every={cfg.eval.knn_every} when data.path is not a built-in dataset")
    positive("distributed.bucket_cap_mb", cfg.distributed.bucket_cap_mb)
    if cfg.model.drop_path_impl == "subset" and cfg.model.pack_crops:
        raise ConfigError("config key 'model.drop_path_impl' = subset works on unpacked crops only; with "
                          "model.pack_crops=true use model.drop_path_impl=mask")
    if cfg.model.sdpa_backend != "auto" and cfg.model.attention != "sdpa":
        raise ConfigError(f"config key 'model.sdpa_backend' = {cfg.model.sdpa_backend} needs model.attention=sdpa, "
                          f"got model.attention={cfg.model.attention}")


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        pairs.append((key.strip(), value.strip()))
    return pairs


# Defaults of a run that continues from released weights (`model.init_from`): applied by `load_config` to each key
# that neither the YAML file nor an override sets. Gentler than pretraining from scratch, so that the first steps
# keep what the loaded backbone knows: a lower lr, layer-wise lr decay and a slower patch embedding (DINOv2's
# `layerwise_decay` and `patch_embed_lr_mult`), the backbone frozen while fresh heads warm up, then its lr ramped
# in over as many steps (its Adam state is fresh at the unfreeze). These two are in steps, not in epochs of the
# user's data, so they hold at any data set size; the run's own lr warm-up (`optim.warmup_epochs`) is left to the
# user. Each value and its measurement: docs/continue.md.
CONTINUE_DEFAULTS: dict[str, Any] = {
    "optim.lr": 1e-4,
    "optim.layer_decay": 0.9,
    "optim.patch_embed_lr_mult": 0.2,
    "train.freeze_backbone_steps": 20,
    "train.unfreeze_warmup_steps": 20,
}


def _leaf_keys(key: str, value: Any) -> list[str]:
    """The dotted leaf keys a YAML entry sets (a section's mapping names several)."""
    if isinstance(value, dict):
        return [leaf for sub_key, sub_value in value.items() for leaf in _leaf_keys(f"{key}.{sub_key}", sub_value)]
    return [key]


def _read_config_chain(path: str | Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML mappings to apply, in order: a file's `base` (and its bases) first, then the file itself.

    `base: NAME` names another config: a path relative to the file's folder, or the name of a config shipped in
    the package (`small_data` is engine/configs/small_data.yaml), so that a recipe for one data set holds only what
    differs from the general one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r}: its 'base' chain comes back to it")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' names another config file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        from ibot_engine.configs import config_path  # packaged recipes, e.g. `base: small_data`

        base_path = config_path(base)
        if base_path is None:
            raise ConfigError(f"{path}: 'base' = {base!r} is neither a file next to it nor a packaged config")
    return [*_read_config_chain(base_path, (*seen, path.resolve())), (path, data)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (after its `base` chain), then `key=value` overrides; validated. With
    `model.init_from` set, the keys of `CONTINUE_DEFAULTS` that neither the file nor an override sets take its
    values."""
    cfg = Config()
    user_keys: set[str] = set()
    for source, data in _read_config_chain(path) if path is not None else []:
        for key, value in data.items():
            try:
                _set(cfg, str(key), value)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
            user_keys.update(_leaf_keys(str(key), value))
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value)
        user_keys.add(key)
    if cfg.model.init_from:
        for key, value in CONTINUE_DEFAULTS.items():
            if key not in user_keys:
                _set(cfg, key, value)
    _check(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in data.items():
        _set(cfg, key, value)
    _check(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
