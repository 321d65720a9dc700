"""Continuing from released weights (`model.init_from`): layer-wise lr decay, the backbone freeze, first-batch
centres, the continuation defaults, and an official iBOT checkpoint loaded tensor for tensor.

Every model here is the tiny one of tests/helpers.py (ViT-tiny/8 at 32 px, batch 4); the released files are written
in the official layouts from our own model's random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

import ibot_engine.train.step as step_module
from ibot_engine.config import CONTINUE_DEFAULTS, ConfigError, load_config
from ibot_engine.distributed import DistEnv
from ibot_engine.model.ibot import IBOT
from ibot_engine.train.continuation import load_released_, resolve_start
from ibot_engine.train.loop import train
from ibot_engine.train.optim import apply_hyperparams, build_optimizer
from ibot_engine.train.schedules import hyperparams_at
from ibot_engine.train.step import train_step
from ibot_engine.train.trainer import build_trainer
from tests.helpers import TINY_OVERRIDES, read_metrics

CPU = DistEnv(0, 1, 0, torch.device("cpu"))
SMALL = [*TINY_OVERRIDES, "train.batch_size=4", "model.drop_path=0", "data.builtin_size=32", "optim.lr=0.05",
         "optim.warmup_epochs=0", "optim.min_lr=0.05"]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [*SMALL, f"run.dir={tmp_path / 'run'}", *extra])


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay and the patch-embedding multiplier


def dinov2_lr_multiplier(name: str, lr_decay_rate: float, num_layers: int, force_is_backbone: bool,
                         patch_embed_lr_mult: float) -> float:
    """A literal reading of DINOv2's `get_vit_lr_decay_rate` (dinov2/utils/param_groups.py) and the
    `patch_embed_lr_mult` line of `get_params_groups_with_decay`, which DINOv2 calls on each student submodule with
    its own parameter names (`force_is_backbone` for the backbone). `register_tokens` sits in layer 0 as DINOv3's
    `storage_tokens` does (dinov3/train/param_groups.py)."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if (".pos_embed" in name or ".patch_embed" in name or ".mask_token" in name or ".cls_token" in name  # noqa: SIM114
                or ".register_tokens" in name):
            layer_id = 0
        elif force_is_backbone and ("pos_embed" in name or "patch_embed" in name or "mask_token" in name
                                    or "cls_token" in name or "register_tokens" in name):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    multiplier = lr_decay_rate ** (num_layers + 1 - layer_id)
    if "patch_embed" in name:
        multiplier *= patch_embed_lr_mult
    return multiplier


def test_layer_decay_group_lrs_follow_dinov2s_rule(tmp_path):
    cfg = _cfg(tmp_path, "optim.layer_decay=0.75", "optim.patch_embed_lr_mult=0.2", "model.num_register_tokens=2",
               "model.layerscale=1e-5")
    model = IBOT(cfg.model, cfg.loss)
    optimizer = build_optimizer(model.student, cfg.optim, CPU.device)
    apply_hyperparams(optimizer, lr=0.01, weight_decay=0.04)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    backbone, depth = model.student.backbone, len(model.student.backbone.blocks)
    expected = {id(p): dinov2_lr_multiplier(n, 0.75, depth, True, 0.2) for n, p in backbone.named_parameters()}
    expected |= {id(p): dinov2_lr_multiplier(n, 0.75, 0, False, 0.2) for n, p in model.student.head.named_parameters()
                 if p.requires_grad}
    assert lr_of.keys() == expected.keys()
    names = {id(p): n for n, p in model.student.named_parameters()}
    for key, multiplier in expected.items():
        assert lr_of[key] == pytest.approx(0.01 * multiplier, rel=1e-12), names[key]
    # The rule's range: the embeddings at 0.75 ** (depth + 1) (x 0.2 for the patch embedding), the head at 1.
    assert lr_of[id(backbone.patch_embed.weight)] == pytest.approx(0.01 * 0.75 ** (depth + 1) * 0.2)
    assert lr_of[id(backbone.register_tokens)] == pytest.approx(0.01 * 0.75 ** (depth + 1))
    assert lr_of[id(model.student.head.last_layer.weight_v)] == pytest.approx(0.01)
    # Weight decay keeps the official grouping (biases and 1-D parameters undecayed), whatever the lr scale.
    for n, p in model.student.named_parameters():
        undecayed = n.endswith(".bias") or p.ndim <= 1
        assert decay_of[id(p)] == (0.0 if undecayed else 0.04), n
    # One group per (decay, last layer, scale): blocks' weights and biases share their block's groups.
    assert len(optimizer.param_groups) == len({(g["decay"], g["last_layer"], g["lr_scale"])
                                               for g in optimizer.param_groups})


def test_default_scales_give_the_four_official_groups(tmp_path):
    cfg = _cfg(tmp_path)
    model = IBOT(cfg.model, cfg.loss)
    optimizer = build_optimizer(model.student, cfg.optim, CPU.device)
    assert [(g["decay"], g["last_layer"], g["lr_scale"]) for g in optimizer.param_groups] == [
        (True, False, 1.0), (False, False, 1.0), (True, True, 1.0)]  # weight_g is [K, 1]: decayed, as officially
    apply_hyperparams(optimizer, lr=0.01, weight_decay=0.04)
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)


# ----------------------------------------------------------------------------------------------------------------
# Continuation defaults


def test_continue_defaults_apply_only_to_keys_the_user_did_not_set(tmp_path):
    weights = tmp_path / "released.pth"
    weights.write_bytes(b"")  # load_config does not read it
    plain = load_config(None, [])
    cfg = load_config(None, [f"model.init_from={weights}", "optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4  # set by the user
    for key, value in CONTINUE_DEFAULTS.items():
        if key != "optim.lr":
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value != getattr(getattr(plain, section), name), key
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"optim": {"layer_decay": 0.8}, "train.freeze_backbone_steps": 5}))
    cfg = load_config(preset, [f"model.init_from={weights}"])
    assert (cfg.optim.layer_decay, cfg.train.freeze_backbone_steps) == (0.8, 5)  # the file's values
    assert (cfg.optim.lr, cfg.optim.patch_embed_lr_mult) == (CONTINUE_DEFAULTS["optim.lr"],
                                                             CONTINUE_DEFAULTS["optim.patch_embed_lr_mult"])
    # Without model.init_from nothing changes, and the keys are validated.
    assert load_config(preset, []).optim.lr == plain.optim.lr
    with pytest.raises(ConfigError, match=r"optim\.layer_decay"):
        load_config(None, ["optim.layer_decay=0"])


# ----------------------------------------------------------------------------------------------------------------
# First-batch centres


def _steps(t, batches):
    """The loop's body over `batches` (an iterator of the trainer's batches) from step `t.step`; yields the losses
    after each step."""
    ema_pairs = t.model.ema_pairs()
    params = [p for p in t.model.student.parameters() if p.requires_grad]
    t.model.train()
    for batch in batches:
        hp = hyperparams_at(t.step, t.cfg, t.total_steps, t.steps_per_epoch, 1)
        losses, _, _ = train_step(t, batch, hp, None, ema_pairs, params)
        t.step += 1
        yield losses


def test_first_batch_centres_are_the_teachers_means_before_the_first_loss(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "loss.center_init=first_batch", "train.steps=2")
    t = build_trainer(cfg, CPU)
    batch = next(iter(t.data))
    with torch.no_grad():
        teacher = t.model.teacher_forward(batch.global_crops, batch.mask_indices)
    cls_mean = teacher.cls_logits.float().mean(0)
    patch_mean = teacher.patch_sum / teacher.patch_count
    used = []
    real_loss = step_module.ibot_loss

    def recording_loss(*args, **kwargs):  # the real objective; records the centres the first loss is given
        used.append((args[5].clone(), args[6].clone()))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(step_module, "ibot_loss", recording_loss)
    next(_steps(t, iter([batch])))
    torch.testing.assert_close(used[0][0], cls_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(used[0][1], patch_mean, rtol=1e-6, atol=1e-6)
    # After the step the EMA moved them by the same batch: still its means (zero-started centres would be 0.1 x).
    torch.testing.assert_close(t.model.cls_center, cls_mean, rtol=1e-5, atol=1e-6)
    assert float(cls_mean.abs().max()) > 1e-3  # a check that can fail: the means are not zero


def test_zero_centres_stay_the_official_start(tmp_path, monkeypatch):
    t = build_trainer(_cfg(tmp_path, "train.steps=2"), CPU)  # center_init=auto, no init_from: zero
    used = []
    real_loss = step_module.ibot_loss
    monkeypatch.setattr(step_module, "ibot_loss", lambda *a, **k: used.append(a[5].clone()) or real_loss(*a, **k))
    next(_steps(t, iter(t.data)))
    assert torch.equal(used[0], torch.zeros_like(used[0]))
    assert dataclasses.asdict(t.cfg) == dataclasses.asdict(_cfg(tmp_path, "train.steps=2"))  # nothing resolved


# ----------------------------------------------------------------------------------------------------------------
# Released files: official iBOT layouts written from our own model's random weights


def _official_backbone_key(key: str) -> str:
    """Our backbone key -> bytedance/ibot's `VisionTransformer` key."""
    if key.startswith("patch_embed."):
        return key.replace("patch_embed.", "patch_embed.proj.", 1)
    return "masked_embed" if key == "mask_token" else key


def _official_ibot_full(model: IBOT, path: Path) -> dict:
    """`model` written as bytedance/ibot's `checkpoint.pth` (main_ibot.py): the DDP student (`module.` prefix, a
    shared head whose `last_layer2` is an alias of `last_layer`), the bare teacher, and the loss's centres."""
    student, teacher = {}, {}
    for network, out, prefix in ((model.student, student, "module."), (model.teacher, teacher, "")):
        for key, value in network.state_dict().items():
            part, rest = key.split(".", 1)
            name = f"{prefix}backbone.{_official_backbone_key(rest)}" if part == "backbone" else f"{prefix}{key}"
            out[name] = value.clone()
            if rest.startswith("last_layer."):  # the shared head's alias
                out[f"{prefix}head.{rest.replace('last_layer.', 'last_layer2.')}"] = value.clone()
    checkpoint = {
        "student": student, "teacher": teacher, "epoch": 100,
        "ibot_loss": {"center": model.cls_center.reshape(1, -1).clone(),
                      "center2": model.patch_center.reshape(1, 1, -1).clone()},
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=model.cls_center.numel(),
                                   norm_last_layer=False, shared_head=True),
    }
    torch.save(checkpoint, path)
    return checkpoint


def _random_released_model(tmp_path: Path, *extra: str) -> IBOT:
    """A tiny IBOT with every tensor random and the teacher unlike the student (as after pretraining)."""
    cfg = _cfg(tmp_path, *extra)
    torch.manual_seed(123)
    model = IBOT(cfg.model, cfg.loss)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for name, p in model.student.named_parameters():
            if name in ("backbone.mask_token", "backbone.cls_token", "backbone.pos_embed"):
                p.normal_()  # zero at init: make them tell the networks apart
        model.cls_center.normal_()
        model.patch_center.normal_()
    return model


def test_official_ibot_full_checkpoint_continues_with_every_tensor_equal_to_the_file(tmp_path, caplog):
    """The acceptance check: student and teacher with their heads, and both centres, equal the file's at step 0;
    the config carries the file's head size; the freeze is not applied to loaded heads; the run then trains, and
    resumes from its own checkpoint without the file."""
    released = _random_released_model(tmp_path, "model.out_dim=64")
    file = tmp_path / "checkpoint.pth"
    official = _official_ibot_full(released, file)
    cfg = _cfg(tmp_path, f"model.init_from={file}", "train.steps=2")  # out_dim 256 in the config: the file's wins
    assert cfg.train.freeze_backbone_steps == CONTINUE_DEFAULTS["train.freeze_backbone_steps"]
    with caplog.at_level("INFO"):
        t = build_trainer(cfg, CPU)
    assert t.cfg.model.out_dim == 64 and t.cfg.train.freeze_backbone_steps == 0
    assert t.cfg.loss.center_init == "zero"  # the file's centres
    assert t.cfg.train.unfreeze_warmup_steps == 0
    assert "freeze_backbone_steps=20 and train.unfreeze_warmup_steps=20 ignored" in caplog.text
    assert "model.init_from:" in caplog.text
    expected = {}
    for role, prefix in (("student", "module."), ("teacher", "")):
        for key, value in official[role].items():
            rest = key.removeprefix(prefix)
            if rest.startswith("backbone."):
                official_to_ours = {_official_backbone_key(k): k for k in released.student.backbone.state_dict()}
                expected[f"{role}.backbone.{official_to_ours[rest.removeprefix('backbone.')]}"] = value
            elif "last_layer2" not in rest:
                expected[f"{role}.{rest}"] = value
    expected["cls_center"] = official["ibot_loss"]["center"][0]
    expected["patch_center"] = official["ibot_loss"]["center2"][0, 0]
    state = t.model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key
    assert not torch.equal(state["teacher.backbone.norm.weight"], state["student.backbone.norm.weight"])

    train(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["out_dim"] == 64 and saved["model"]["init_from"] == str(file)
    file.unlink()  # a resumed run does not read model.init_from
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3)))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_file_that_does_not_fit_fails_before_the_data_is_read(tmp_path):
    file = tmp_path / "checkpoint.pth"
    _official_ibot_full(_random_released_model(tmp_path), file)
    with pytest.raises(ConfigError, match=r"model\.patch_size.*checkpoint\.pth|checkpoint\.pth.*model\.patch_size"):
        build_trainer(_cfg(tmp_path, f"model.init_from={file}", "model.patch_size=16", "data.path=/nonexistent"),
                      CPU)


def test_backbone_freeze_keeps_the_backbone_and_its_adam_state_untouched_while_fresh_heads_learn(tmp_path, caplog):
    """A backbone-only file (iBOT's extract_backbone_weights layout): the heads start fresh, so the backbone is
    frozen for train.freeze_backbone_steps; then it trains, with an Adam state that starts at its first update."""
    released = _random_released_model(tmp_path)
    backbone = {_official_backbone_key(k): v.clone() for k, v in released.teacher.backbone.state_dict().items()}
    file = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": backbone}, file)
    with caplog.at_level("INFO"):
        t = build_trainer(_cfg(tmp_path, f"model.init_from={file}", "train.freeze_backbone_steps=2",
                               "train.unfreeze_warmup_steps=0", "train.steps=3"), CPU)
    assert t.cfg.loss.center_init == "first_batch"  # no centres in the file
    assert "backbone frozen for the first 2 steps" in caplog.text
    student = t.model.student
    start = {k: v.clone() for k, v in student.state_dict().items()}
    assert all(torch.equal(start[f"backbone.{k}"], v) for k, v in released.teacher.backbone.state_dict().items())
    head_params = list(student.head.parameters())
    backbone_params = list(student.backbone.parameters())
    steps = _steps(t, iter(t.data))
    for _ in range(2):
        next(steps)
        now = student.state_dict()
        assert all(torch.equal(now[k], start[k]) for k in start if k.startswith("backbone.")), t.step
        assert not all(torch.equal(now[k], start[k]) for k in start if k.startswith("head."))
        assert all(not t.optimizer.state[p] for p in backbone_params)  # no moments, no step count
    next(steps)
    now = student.state_dict()
    assert not torch.equal(now["backbone.blocks.0.attn.qkv.weight"], start["backbone.blocks.0.attn.qkv.weight"])
    assert {float(t.optimizer.state[p]["step"]) for p in backbone_params} == {1.0}
    assert {float(t.optimizer.state[p]["step"]) for p in head_params} == {3.0}


def test_backbone_lr_ramps_in_after_the_freeze_while_the_heads_keep_the_scheduled_lr(tmp_path, caplog):
    """train.unfreeze_warmup_steps: after the freeze the backbone's groups get (k + 1) / (ramp + 1) of their
    scheduled lr at the k-th unfrozen step, the heads' groups all of it; the backbone moves from its first unfrozen
    step, by less than at the full lr."""
    released = _random_released_model(tmp_path)
    file = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": {_official_backbone_key(k): v.clone()
                               for k, v in released.teacher.backbone.state_dict().items()}}, file)
    runs = {}
    for ramp in (2, 0):
        with caplog.at_level("INFO"):
            t = build_trainer(_cfg(tmp_path / str(ramp), f"model.init_from={file}", "train.freeze_backbone_steps=2",
                                   f"train.unfreeze_warmup_steps={ramp}", "optim.layer_decay=0.5", "train.steps=5"),
                              CPU)
        student = t.model.student
        backbone = {id(p) for p in student.backbone.parameters()}
        for g in t.optimizer.param_groups:  # with the ramp, no group mixes the backbone and the heads
            assert {id(p) in backbone for p in g["params"]} == {g["backbone"]} if ramp else not g["backbone"]
        steps, moved = _steps(t, iter(t.data)), []
        for step, factor in enumerate((0.0, 0.0, 1 / 3, 2 / 3, 1.0) if ramp else (0.0, 0.0, 1.0, 1.0, 1.0)):
            before = student.backbone.blocks[0].attn.qkv.weight.detach().clone()
            next(steps)
            scheduled = hyperparams_at(step, t.cfg, t.total_steps, t.steps_per_epoch, 1).lr
            for g in t.optimizer.param_groups:
                want = scheduled * g["lr_scale"] * (factor if g["backbone"] else 1.0)
                assert g["lr"] == pytest.approx(want, rel=1e-12), (ramp, step, g["lr_scale"], g["backbone"])
            moved.append((student.backbone.blocks[0].attn.qkv.weight - before).abs().max().item())
        runs[ramp] = moved
    assert "frozen for the first 2 steps, then its lr ramped in over 2 steps" in caplog.text
    assert runs[2][:2] == runs[0][:2] == [0.0, 0.0]  # frozen
    assert 0 < runs[2][2] < runs[0][2]  # the first unfrozen step moves it, by a third of the full lr's step


def test_a_resolution_change_with_koleo_and_fresh_heads_is_pointed_at_the_measurement(tmp_path, caplog):
    """A backbone-only file trained at 32 px, continued at 48 px: the load says that KoLeo re-spreads the cls
    embeddings at a new resolution, only when KoLeo is on and the size changes."""
    released = _random_released_model(tmp_path)
    file = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": {_official_backbone_key(k): v.clone()
                               for k, v in released.teacher.backbone.state_dict().items()}}, file)
    for size, koleo, said in ((48, 0.1, True), (48, 0.0, False), (32, 0.1, False)):
        caplog.clear()
        cfg, weights = resolve_start(_cfg(tmp_path, f"model.init_from={file}", f"model.img_size={size}",
                                          f"loss.koleo_weight={koleo}"))
        with caplog.at_level("INFO"):
            load_released_(IBOT(cfg.model, cfg.loss), weights, cfg)
        assert ("re-spreads its cls embeddings" in caplog.text) == said, (size, koleo)
        assert "model.init_from:" in caplog.text


def test_lightning_module_starts_from_the_file_as_our_trainer_does(tmp_path):
    pytest.importorskip("lightning", reason="the optional extra is not installed: pip install -e '.[lightning]'")
    from ibot_engine.integrations.lightning import IBOTLightningModule

    file = tmp_path / "checkpoint.pth"
    _official_ibot_full(_random_released_model(tmp_path, "model.out_dim=64"), file)
    cfg = _cfg(tmp_path, f"model.init_from={file}")
    module, t = IBOTLightningModule(cfg), build_trainer(cfg, CPU)
    assert module.cfg == t.cfg and module.hparams["cfg"]["model"]["out_dim"] == 64
    ours = t.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in module.model.state_dict().items())
