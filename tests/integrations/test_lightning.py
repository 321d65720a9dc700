"""The Lightning entry point (`ibot_engine.integrations.lightning`) against our own loop: same seed, batches and config
give the same per-step losses and the same weights, in one process and in 2-process DDP (CPU, gloo); and the example
scripts run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the optional extra is not installed: pip install -e '.[lightning]'")

import lightning as L
from safetensors.torch import load_file

import ibot_engine.integrations.lightning as engine_lightning
from ibot_engine.integrations.lightning import IBOTDataModule, IBOTLightningModule
from ibot_engine.train.health import NonFiniteLossError
from tests.helpers import TINY_OVERRIDES
from tests.integrations.test_library import EXAMPLE_RUN, EXAMPLES, ROOT, _cfg, assert_same_state, child_env, run_ours

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def fit_lightning(cfg, **trainer_kwargs) -> tuple[IBOTLightningModule, list[float]]:
    module, recorder = IBOTLightningModule(cfg), LossRecorder()
    callbacks = [recorder, *trainer_kwargs.pop("callbacks", [])]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, callbacks=callbacks, **{**QUIET, **trainer_kwargs})
    trainer.fit(module, datamodule=IBOTDataModule(cfg))
    return module, recorder.losses


@pytest.mark.parametrize(
    "options",
    [
        (),
        ("loss.centering=sinkhorn", "mask.variant=dinov2", "loss.patch_center=masked", "optim.clip_mode=per_param",
         "loss.teacher_temp_per_step=true", "model.norm_last_layer=true"),
    ],
    ids=["official", "dinov2-options"],
)
def test_lightning_module_matches_our_loop(tmp_path, options):
    losses, state = run_ours(tmp_path / "ours", *EXAMPLE_RUN, *options)
    module, lightning_losses = fit_lightning(_cfg(*EXAMPLE_RUN, *options))
    assert module.total_steps == 4 and module.steps_per_epoch == 3
    assert lightning_losses == pytest.approx(losses, rel=1e-5)
    assert_same_state(module.model.state_dict(), state)
    # The EMA ran outside autograd: the teacher's parameters are still plain leaves.
    assert all(p.is_leaf and p.grad_fn is None for p in module.model.teacher.parameters())


def test_lightning_refuses_trainer_clipping_and_accumulation():
    cfg = _cfg("train.steps=2")
    with pytest.raises(ValueError, match=r"optim\.clip_grad"):
        L.Trainer(accelerator="cpu", gradient_clip_val=1.0, **QUIET).fit(IBOTLightningModule(cfg), IBOTDataModule(cfg))
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        L.Trainer(accelerator="cpu", accumulate_grad_batches=2, **QUIET).fit(IBOTLightningModule(cfg),
                                                                             IBOTDataModule(cfg))


def test_lightning_non_finite_loss_stops_before_a_checkpoint(tmp_path, monkeypatch):
    real, calls = engine_lightning.forward_losses, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out._replace(losses=out.losses._replace(total=out.losses.total * float("nan"))) if calls["n"] >= 3 \
            else out

    monkeypatch.setattr(engine_lightning, "forward_losses", poisoned)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at or before step 4"):
        fit_lightning(_cfg("train.steps=6"), enable_checkpointing=True, callbacks=[saver])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt"]
    good = IBOTLightningModule.load_from_checkpoint(tmp_path / "epoch=0-step=2.ckpt", weights_only=True)
    assert good.cfg == _cfg("train.steps=6")  # rebuilt from the checkpoint's own config
    assert all(torch.isfinite(v).all() for v in good.model.state_dict().values())


def read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "lightning" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_lightning_example_matches_our_loop(tmp_path):
    losses, state = run_ours(tmp_path / "ours", *EXAMPLE_RUN)
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "ibot_lightning.py"), "--config", "", *TINY_OVERRIDES, *EXAMPLE_RUN,
         f"run.dir={tmp_path / 'example'}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv_metrics(tmp_path / "example")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses, rel=1e-5)
    assert all(r["lr"] and r["grad_norm"] for r in rows)
    assert_same_state(load_file(tmp_path / "example" / "ibot_model.safetensors"), state)


# Our loop under torchrun, recording the mean loss over ranks of every step (computed as
# ibot_engine.integrations.lightning logs it) and the final model state. Our metrics.jsonl `loss` is not used: what
# it holds under several ranks may change.
OURS_DDP = textwrap.dedent("""
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    import ibot_engine.train.loop as T
    from ibot_engine.config import load_config
    from ibot_engine.distributed import all_reduce_sum

    out, overrides = sys.argv[1], sys.argv[2:]
    losses, seen = [], {}
    real_step = T.train_step

    def recording_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        trainer = next(a for a in args if isinstance(a, T.Trainer))
        seen["model"] = trainer.model
        losses.append(all_reduce_sum(result[0].total.detach().clone()) / trainer.env.world_size)
        return result

    T.train_step = recording_step
    T.train(load_config(None, overrides))
    if int(os.environ["RANK"]) == 0:
        save_file(seen["model"].state_dict(), os.path.join(out, "ibot_model.safetensors"))
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump([x.item() for x in losses], f)
""")


@pytest.mark.distributed
def test_lightning_ddp_example_matches_our_2_rank_loop(tmp_path):
    # 40 images, 2 ranks x 8: 2 steps per epoch; 4 steps cross an epoch; drop-path on (the default 0.1).
    run = (*TINY_OVERRIDES, "data.builtin_size=40", "train.steps=4", "optim.freeze_last_layer_epochs=1",
           "distributed.strategy=ddp")
    ours, example = tmp_path / "ours", tmp_path / "example"
    ours.mkdir()
    (tmp_path / "ours_ddp.py").write_text(OURS_DDP)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(tmp_path / "ours_ddp.py"), str(ours), *run, f"run.dir={ours}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "ibot_lightning_distributed.py"), "--accelerator", "cpu", "--devices", "2",
         "--config", "", *run, f"run.dir={example}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = json.loads((ours / "losses.json").read_text())
    rows = read_csv_metrics(example)
    assert len(losses) == 4 and [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses, rel=1e-5)
    state = load_file(ours / "ibot_model.safetensors")
    assert_same_state(load_file(example / "ibot_model.safetensors"), state)


def test_lightning_bf16_mixed_runs():
    # Lightning's autocast around our step; the objective and the centres stay fp32.
    module, losses = fit_lightning(_cfg("train.steps=2"), precision="bf16-mixed")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert module.model.cls_center.dtype == torch.float32 and module.model.cls_center.abs().sum() > 0


def test_lightning_accumulation_equals_our_loop_on_the_whole_batch(tmp_path):
    """Trainer(accumulate_grad_batches=4) with train.accum_steps=4 and batch 2 is our loop's step on batch 8: the
    centres move once per optimizer step, the schedules count optimizer steps (drop path off: its draws follow the
    micro-batches; KoLeo off: its neighbours are searched within each micro-batch)."""
    run = ("data.builtin_size=24", "train.steps=4", "optim.freeze_last_layer_epochs=1", "model.drop_path=0")
    _, state = run_ours(tmp_path / "ours", *run)  # train.batch_size=8: 3 steps per epoch
    module, _ = fit_lightning(_cfg(*run, "train.batch_size=2", "train.accum_steps=4"), accumulate_grad_batches=4)
    assert module.steps_per_epoch == 3 and module.global_step == 4
    mine = module.model.state_dict()
    for key in state:
        if key.startswith("teacher.") or key.endswith("_center"):
            torch.testing.assert_close(mine[key], state[key], atol=1e-5, rtol=0, msg=key)
    with pytest.raises(ValueError, match=r"sinkhorn"):
        fit_lightning(_cfg(*run, "train.batch_size=2", "train.accum_steps=4", "loss.centering=sinkhorn"),
                      accumulate_grad_batches=4)
