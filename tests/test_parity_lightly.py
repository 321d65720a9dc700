"""Whole-step parity with lightly's iBOT example (lightly 1.6, `examples/pytorch/ibot.py`).

From the same initial weights (lightly's timm ViT and DINO heads copied into our `IBOT`), the same crops and the
same masks, `STEPS` training steps of our `ibot_engine.train.step.train_step` equal the example's loop body, in fp32:
the cls and patch losses, every student gradient, the updated student and teacher, and both centres.

The example's model and loop body are built in `ibot_engine.bench.lightly_example` (`LightlyExample`,
`lightly_example_step`: its model pieces, `DINOLoss`, `IBOTPatchLoss`, `update_momentum`, in its order), which
`ibot bench --compare lightly` times and `python -m ibot_benchmarks.peer_learning` trains on real images.
Differences set equal through our config:
    lr                constant 1e-3: optim.lr = 1e-3 * 256 / B, warmup 0, min_lr = the peak
    clipping, freeze  none: optim.clip_grad=0, optim.freeze_last_layer_epochs=0
    teacher temp      per-step linear warm-up 0.04 -> 0.07: loss.teacher_temp_per_step=true (+ the epochs)
    EMA start         0.992: optim.momentum_teacher=0.992
    patch centre      over the masked teacher tokens: loss.patch_center=masked
    LayerScale        1e-5: model.layerscale=1e-5
Remaining intentional differences, each set equal in this test:
    weight decay groups  ours (the official iBOT grouping) exempts biases and 1-D parameters (LayerNorm, LayerScale)
                         from weight decay; the example decays every parameter. The peer's AdamW gets our groups.
    schedule formulas    lightly's cosine_schedule divides by (total - 1) and ends one step early; ours is the
                         official iBOT cosine (divides by total). Both sides get lightly's weight decay and momentum.
    drop path            0 on both: the random draws come from different streams (lightly's uniform rate is
                         `model.drop_path_uniform=true`, our default the official linear-over-depth rate).
    teacher head init    the example draws the teacher head separately (`model.teacher_head=independent`; default
                         `copy`, the official iBOT); its head's frozen gain is 1, ours starts at 1 too. The
                         weights copied from the peer make them equal here.
    masks                ours (the official block masking) for both; the example's own `random_block_mask` draws
                         another distribution, on the GPU.
    AdamW kernel         ours is torch's fused AdamW; the example's the for-each one: rounding only.

The perturbation tests show that the comparison catches a wrong piece of the step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ibot_engine.objective as objective_module
from ibot_engine.config import load_config
from ibot_engine.data.stream import build_data_stream
from ibot_engine.distributed import DistEnv
from ibot_engine.model.ibot import IBOT
from ibot_engine.train.optim import build_optimizer, param_groups
from ibot_engine.train.parallel import build_grad_scaler
from ibot_engine.train.schedules import hyperparams_at
from ibot_engine.train.step import train_step
from ibot_engine.train.trainer import Trainer

lightly = pytest.importorskip("lightly")
pytest.importorskip("timm")
from lightly.loss import DINOLoss, IBOTPatchLoss  # noqa: E402

from ibot_engine.bench.lightly_example import (  # noqa: E402
    LightlyExample,
    lightly_example_step,
    lightly_schedules,
    ours_state_from_lightly,
)

B, K, STEPS = 4, 256, 3
WARMUP_STEPS = 2  # teacher temperature warm-up: data.builtin_size=16 / B = 4 steps per epoch, 0.5 epochs
# Max |ours - lightly| in fp32 (grad: relative to each tensor's largest gradient), 3 steps. Measured with the
# uint8 CPU augmentation's crops (2026-12-06): loss 9.5e-7, grad 3.2e-5, student 8.3e-6 (AdamW divides tiny
# gradients by their tiny second moments: rounding shows most there), teacher 2.4e-7 (it moves 1 - momentum of
# that), centres 2.4e-8; with the earlier PIL crops grad was 6.3e-6: the same step on other pixels rounds
# differently. A real difference is orders larger (a per-token patch loss: grad 1.9, loss 5.2).
TOL = {"loss": 1e-5, "grad": 1e-4, "student": 5e-5, "teacher": 1e-6, "center": 1e-6}


def _cfg():
    return load_config(None, [
        "model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32", f"model.out_dim={K}",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "model.drop_path=0", "model.layerscale=1e-5",
        "data.path=builtin:patterns", "data.builtin_size=16", "data.global_size=32", "data.local_size=16",
        "data.num_local=2", "data.num_workers=0", f"train.batch_size={B}", f"train.steps={STEPS}", "precision=fp32",
        f"optim.lr={1e-3 * 256 / B}", "optim.warmup_epochs=0", "optim.min_lr=1e-3", "optim.clip_grad=0",
        "optim.freeze_last_layer_epochs=0", "optim.momentum_teacher=0.992", "loss.teacher_temp=0.07",
        "loss.patch_teacher_temp=0.07", "loss.warmup_teacher_temp=0.04", "loss.warmup_patch_teacher_temp=0.04",
        "loss.teacher_temp_per_step=true", "loss.warmup_teacher_temp_epochs=0.5", "loss.patch_center=masked",
        "mask.min_block_patches=2",
    ])


def _peer_name(ours_name: str) -> str:
    """Our student parameter name -> the name in `lightly_example_step`'s gradient snapshot."""
    name = ours_name.replace("patch_embed.", "patch_embed.proj.").replace("head.mlp.", "head.layers.")
    if name.startswith("backbone.") and name != "backbone.mask_token":
        name = name.replace("backbone.", "backbone.vit.", 1)
    return name


def _run(perturb=None) -> dict[str, float]:
    """Max |ours - lightly| over the steps, per kind (`TOL`'s keys)."""
    cfg = _cfg()
    torch.manual_seed(0)
    peer = LightlyExample(arch="vit_tiny", img_size=32, patch_size=8, out_dim=K, hidden_dim=64, bottleneck_dim=32,
                          drop_path=0.0)
    ours = IBOT(cfg.model, cfg.loss)
    ours.load_state_dict(ours_state_from_lightly(peer, ours), strict=True)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    optimizer = build_optimizer(ours.student, cfg.optim, env.device)
    t = Trainer(cfg=cfg, env=env, model=ours, student=ours.student, optimizer=optimizer,
                scaler=build_grad_scaler(cfg, env), data=None, checkpointer=None, total_steps=STEPS)
    if perturb is not None:
        perturb(t)
    # The peer's AdamW with our decay / no-decay groups (see the module docstring); default weight decay 0.01 on
    # the decayed group, which the loop overwrites every step, as the example does.
    peer_groups = param_groups(torch.nn.ModuleDict({"backbone": peer.student_backbone, "head": peer.student_head}))
    peer_opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": 0.01 if g["decay"] else 0.0}
                                  for g in peer_groups], lr=1e-3)
    dino, ibot_patch = DINOLoss(output_dim=K, teacher_temp=0.07), IBOTPatchLoss(output_dim=K, teacher_temp=0.07)

    captured: dict[str, torch.Tensor] = {}
    inner_step = optimizer.step

    def snapshot_then_step(*args, **kwargs):  # the gradients our optimizer is about to apply
        captured.update({n: p.grad.clone() for n, p in ours.student.named_parameters() if p.grad is not None})
        return inner_step(*args, **kwargs)

    optimizer.step = snapshot_then_step
    data = iter(build_data_stream(cfg.data, cfg.mask, batch_size=B, patch_size=8, seed=0, device=env.device))
    ema_pairs = ours.ema_pairs()
    params = [p for p in ours.student.parameters() if p.requires_grad]
    ours.train()
    peer.train()
    worst = dict.fromkeys(TOL, 0.0)
    for step in range(STEPS):
        batch = next(data)
        assert int(batch.masks.sum()) > 0, "the test needs masked tokens in every step"
        hp = hyperparams_at(step, cfg, STEPS, 4, 1)
        assert hp.lr == pytest.approx(1e-3) and hp.teacher_temp == pytest.approx(
            0.04 + 0.03 * min(step / WARMUP_STEPS, 1.0))  # what the config expresses: lightly's values
        theirs_hp = lightly_schedules(step, STEPS, WARMUP_STEPS)
        hp = dataclasses.replace(hp, weight_decay=theirs_hp["weight_decay"], momentum=theirs_hp["momentum"])
        losses, _, _ = train_step(t, batch, hp, None, ema_pairs, params)
        theirs = lightly_example_step(peer, peer_opt, dino, ibot_patch, batch.global_crops, batch.local_crops,
                                      batch.masks, step=step, total_steps=STEPS, warmup_steps=WARMUP_STEPS,
                                      grads=True)

        def diff(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a.detach().reshape(b.shape) - b).abs().max())

        worst["loss"] = max(worst["loss"], diff(losses.cls, theirs["loss_cls"]),
                            diff(losses.patch, theirs["loss_patch"]))
        assert set(map(_peer_name, captured)) == set(theirs["grads"])
        worst["grad"] = max(worst["grad"], *(diff(g, theirs["grads"][_peer_name(n)]) / float(g.abs().max() + 1e-12)
                                             for n, g in captured.items()))
        peer_state = {
            **{f"student.backbone.{k}": v for k, v in peer.student_backbone.vit.state_dict().items()},
            **{f"teacher.backbone.{k}": v for k, v in peer.teacher_backbone.vit.state_dict().items()},
            **{f"student.head.{k}": v for k, v in peer.student_head.state_dict().items()},
            **{f"teacher.head.{k}": v for k, v in peer.teacher_head.state_dict().items()},
            "student.backbone.mask_token": peer.student_backbone.mask_token,
        }
        for name, value in ours.state_dict().items():
            if name.endswith("_center"):
                continue
            peer_key = name.replace("patch_embed.", "patch_embed.proj.").replace("head.mlp.", "head.layers.")
            kind = name.split(".")[0]  # student | teacher
            worst[kind] = max(worst[kind], diff(value, peer_state[peer_key]))
        worst["center"] = max(worst["center"], diff(ours.cls_center, dino.center),
                              diff(ours.patch_center, ibot_patch.center.value))
    return worst


def test_whole_step_equals_lightly_example():
    worst = _run()
    assert all(worst[k] <= TOL[k] for k in TOL), f"max |ours - lightly| per kind {worst}, tolerances {TOL}"


def _ema_before_optimizer_step(t):  # the teacher EMA of the student before its update instead of after
    model, inner_step = t.model, t.optimizer.step
    pairs = model.ema_pairs()
    momentum = {"value": 0.0}
    update_teacher = model.update_teacher

    def capture(value, _pairs=None):
        momentum["value"] = value

    def ema_then_step(*args, **kwargs):
        update_teacher(momentum["value"] or 0.992, pairs)
        return inner_step(*args, **kwargs)

    model.update_teacher = capture
    t.optimizer.step = ema_then_step


def _center_momentum_off(t):  # centres with momentum 0.8 instead of 0.9
    t.model.center_momentum = 0.8


def _patch_loss_per_token(t, monkeypatch):  # patch loss averaged over all masked tokens, not per image first
    monkeypatch.setattr(objective_module, "masked_token_weights",
                        lambda mask, m: torch.full((m,), mask.shape[0] / max(m, 1), device=mask.device))


def _decay_everything(t):  # weight decay on biases and norms too (not the official grouping)
    for group in t.optimizer.param_groups:
        group["decay"] = True


@pytest.mark.parametrize(("perturb", "kinds"), [
    (_ema_before_optimizer_step, {"teacher"}),
    (_center_momentum_off, {"center"}),
    (_patch_loss_per_token, {"loss", "grad"}),
    (_decay_everything, {"student"}),
], ids=["ema_order", "center_momentum", "patch_loss_normalisation", "weight_decay_groups"])
def test_parity_catches_a_perturbed_step(perturb, kinds, monkeypatch):
    if perturb is _patch_loss_per_token:
        worst = _run(lambda t: perturb(t, monkeypatch))
    else:
        worst = _run(perturb)
    caught = {k for k in TOL if worst[k] > TOL[k]}
    assert caught & kinds, f"the perturbation went unnoticed: max |ours - lightly| {worst}"
