"""Starting a run from released weights (`model.init_from`): the config the file fixes, and the weights it loads.

`resolve_start` runs before any data or model work (bad files fail first). Without `model.init_from` it only drops a
`train.freeze_backbone_steps` (and the lr ramp after it, `train.unfreeze_warmup_steps`) that has nothing to
protect. With it:

* a checkpoint to resume (`checkpoint.resume`) wins: the file is not read; the model fields, the freeze and the
  centre rule come from the config that checkpoint saved (they were resolved from the file when the run began);
* otherwise the file is read (`ibot_engine.model.released.read_released`) and checked against `model.arch` /
  `model.patch_size`; the model fields it fixes (registers, RoPE, norm eps, FFN, LayerScale, head sizes when it has
  heads) replace the config's, so the config the run saves builds the same network when it resumes. The freeze
  applies only to heads that start fresh; `loss.center_init=auto` becomes first_batch when the file has no centres.

`load_released_` then fills the built `IBOT`: the student from the file (backbone; heads when present), the teacher
from the file's teacher, else as a copy of the student (heads too when the file has them; fresh heads keep
`model.teacher_head`'s start), and the centres when present; position embeddings resampled once to
`model.img_size` (`fit_state`). A resumed checkpoint later replaces all of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from ibot_engine.checkpoint import META, Checkpointer, is_sharded_checkpoint
from ibot_engine.config import Config, TrainConfig, config_from_dict
from ibot_engine.distributed import broadcast_object
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.released import ReleasedWeights, fit_state, model_config_for, read_released

log = logging.getLogger(__name__)

# Student keys that may start fresh although the file has a backbone: its mask token (backbone-only releases of
# iBOT's teacher and DINO have none; the teacher never has one).
_MAY_START_FRESH = ("backbone.mask_token",)


def resolve_start(cfg: Config, checkpointer: Checkpointer | None = None) -> tuple[Config, ReleasedWeights | None]:
    """The run's config with what `model.init_from` fixes, and the file's weights (None without `model.init_from`
    or when a checkpoint of `checkpointer`'s run will be resumed: `checkpoint.resume`). Collective when distributed
    (every rank calls it): rank 0 picks the checkpoint to resume."""
    train = cfg.train
    if not cfg.model.init_from:
        if train.freeze_backbone_steps or train.unfreeze_warmup_steps:
            log.info("train.freeze_backbone_steps=%d and train.unfreeze_warmup_steps=%d ignored: the run starts from "
                     "scratch (no model.init_from)", train.freeze_backbone_steps, train.unfreeze_warmup_steps)
            cfg = dataclasses.replace(cfg, train=_no_freeze(train))
        return cfg, None
    resume = broadcast_object(checkpointer.resolve_resume(cfg.checkpoint.resume)) if checkpointer else None
    if resume is not None and is_sharded_checkpoint(resume):
        saved = json.loads((Path(resume) / META).read_text()).get("config")
        if saved is not None:
            log.info("model.init_from=%s not read: the run resumes from %s", cfg.model.init_from, resume)
            return _as_saved(cfg, config_from_dict(saved)), None
    released = read_released(cfg.model.init_from, cfg.model.init_format)
    model = model_config_for(released, cfg.model)  # check_model first: an error naming the file and model.* key
    if released.has_heads and (train.freeze_backbone_steps or train.unfreeze_warmup_steps):
        log.info("train.freeze_backbone_steps=%d and train.unfreeze_warmup_steps=%d ignored: the heads come from %s",
                 train.freeze_backbone_steps, train.unfreeze_warmup_steps, released.path)
        train = _no_freeze(train)
    loss = cfg.loss
    if loss.center_init == "auto":
        loss = dataclasses.replace(loss, center_init="zero" if released.cls_center is not None else "first_batch")
    return dataclasses.replace(cfg, model=model, train=train, loss=loss), released


def _no_freeze(train: TrainConfig) -> TrainConfig:
    """No backbone freeze and no lr ramp after it: nothing to protect (loaded heads, or a run from scratch)."""
    return dataclasses.replace(train, freeze_backbone_steps=0, unfreeze_warmup_steps=0)


def _as_saved(cfg: Config, saved: Config) -> Config:
    """`cfg` with the fields that `resolve_start` resolved from the file when the run began, as the run saved them."""
    return dataclasses.replace(
        cfg, model=saved.model,
        train=dataclasses.replace(cfg.train, freeze_backbone_steps=saved.train.freeze_backbone_steps,
                                  unfreeze_warmup_steps=saved.train.unfreeze_warmup_steps),
        loss=dataclasses.replace(cfg.loss, center_init=saved.loss.center_init),
    )


@torch.no_grad()
def load_released_(model: IBOT, released: ReleasedWeights, cfg: Config) -> None:
    """Fill a freshly built `model` (on the CPU, before any wrap) from the file, in place, and log one line saying
    what was loaded and what starts fresh."""
    file = released.path
    student = fit_state(released.student, cfg.model)
    fresh = _load(model.student, student, file, "student", may_miss=_fresh_keys(model.student, released))
    if released.teacher is not None:
        teacher = fit_state(released.teacher, cfg.model)
        teacher_from = "the file's teacher"
    else:  # the teacher starts as the student; fresh heads keep the start model.teacher_head gave them
        teacher = {k: v for k, v in model.student.state_dict().items()
                   if released.has_heads or not k.startswith("head.")}
        teacher_from = "a copy of the student"
    _load(model.teacher, teacher, file, "teacher", may_miss=_fresh_keys(model.teacher, released),
          may_drop=_MAY_START_FRESH)
    centres = "zero"
    if released.cls_center is not None:
        for name, value in (("cls_center", released.cls_center), ("patch_center", released.patch_center)):
            if value is None:
                continue
            buffer = getattr(model, name)
            if value.shape != buffer.shape:
                raise ValueError(f"model.init_from={str(file)!r}: its {name} has shape {list(value.shape)}, the "
                                 f"heads' {list(buffer.shape)}")
            buffer.copy_(value)
        centres = "from the file"
    if cfg.loss.center_init == "first_batch":
        centres = "the first batch's teacher means"
    native = released.model.get("img_size") if released.model.get("pos_embed") != "rope" else None  # RoPE: 224 nominal
    if not released.has_heads and cfg.loss.koleo_weight > 0 and native and native != cfg.model.img_size:
        log.info("model.init_from: the backbone comes from %d px and trains at model.img_size=%d with "
                 "loss.koleo_weight=%g: at a new resolution KoLeo re-spreads its cls embeddings while the heads are "
                 "fresh, and on the digits at 64 px that cost k-NN that loss.koleo_weight=0 kept (docs/continue.md, "
                 "\"Changing resolution\")", native, cfg.model.img_size, cfg.loss.koleo_weight)
    freeze, ramp = cfg.train.freeze_backbone_steps, cfg.train.unfreeze_warmup_steps
    log.info("model.init_from: %s (%s): student %s, teacher %s, centres %s; fresh: %s%s%s", file, released.format,
             "backbone and heads" if released.has_heads else "backbone", teacher_from, centres,
             ", ".join(fresh) if fresh else "nothing",
             f"; student backbone frozen for the first {freeze} steps" if freeze else "",
             f", then its lr ramped in over {ramp} steps" if ramp else "")


def _fresh_keys(network: nn.Module, released: ReleasedWeights) -> tuple[str, ...]:
    """The network's keys (prefixes) allowed to be missing from the file: the mask token, and the heads when the
    file has none."""
    return _MAY_START_FRESH if released.has_heads else (*_MAY_START_FRESH, "head.")


def _load(network: nn.Module, state: dict[str, Tensor], file: Path, role: str, *, may_miss: tuple[str, ...],
          may_drop: tuple[str, ...] = ()) -> list[str]:
    """Load `state` into `network`; returns what starts fresh (as words). Every other missing or unexpected key, or
    a shape that differs, is an error naming the file and the keys."""
    own = network.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(may_drop) and k not in own)}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    not_allowed = [k for k in missing if not k.startswith(may_miss)]
    if unexpected or not_allowed:
        raise ValueError(f"model.init_from={str(file)!r}: the {role} does not fit the model: keys not in the model "
                         f"{unexpected[:8]}, model keys not in the file {not_allowed[:8]}")
    wrong = [f"{k} {list(v.shape)} (model {list(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"model.init_from={str(file)!r}: {role} shapes differ from the model's: {wrong[:8]}")
    network.load_state_dict(state, strict=False)
    fresh = []
    if any(k.startswith("head.") for k in missing):
        fresh.append(f"{role} heads")
    if any(k.startswith("backbone.mask_token") for k in missing):
        fresh.append(f"{role} mask token")
    return fresh
