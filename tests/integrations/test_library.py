"""The engine as a library: the per-epoch DataLoader, `forward_losses`, the plain PyTorch example, and the rule that
nothing but `ibot_engine.integrations.lightning` imports Lightning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ibot_engine.checkpoint import Checkpointer, load_checkpoint
from ibot_engine.data.epoch_loader import build_train_loader
from ibot_engine.data.stream import build_data_stream
from ibot_engine.train.loop import train
from tests.helpers import TINY_OVERRIDES, read_metrics, tiny_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "launch" / "examples"


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cfg(*extra: str):
    return tiny_config(*extra)


@pytest.mark.parametrize("rank", [0, 1])
def test_train_loader_yields_the_data_stream_batches(rank):
    # 40 images, 2 ranks x 8: 2 steps per epoch and a dropped tail of 8; two epochs.
    cfg = _cfg("data.builtin_size=40")
    loader = build_train_loader(cfg, rank=rank, world_size=2, device=torch.device("cpu"))
    stream = build_data_stream(cfg.data, cfg.mask, batch_size=8, patch_size=cfg.model.patch_size, seed=cfg.train.seed,
                               rank=rank, world_size=2, device=torch.device("cpu"))
    assert len(loader) == stream.steps_per_epoch == 2
    ours = iter(stream)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            expected = next(ours)
            for name in ("global_crops", "local_crops", "masks", "mask_indices", "labels", "indices"):
                assert torch.equal(getattr(batch, name), getattr(expected, name)), (epoch, name)


def test_train_loader_rejects_a_dataset_smaller_than_a_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch of 32"):
        build_train_loader(_cfg("data.builtin_size=24"), rank=0, world_size=4)


def test_importing_the_package_never_imports_lightning():
    code = (
        "import pkgutil, importlib, sys, ibot_engine, ibot_kernels\n"
        "for pkg in (ibot_engine, ibot_kernels):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name in ('ibot_engine.integrations.lightning', 'ibot_engine.__main__'):\n"
        "            continue\n"
        "        try:\n"
        "            importlib.import_module(m.name)\n"
        "        except ModuleNotFoundError as err:  # another optional extra; never Lightning itself\n"
        "            assert (err.name or '').split('.')[0] not in ('lightning', 'pytorch_lightning'), m.name\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & {'lightning', 'pytorch_lightning'})\n"
        "assert not bad, bad\n"
        "print('imported', sum(n.startswith('ibot_engine.') for n in sys.modules), 'engine modules')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[1]) > 15


def run_ours(run_dir: Path, *extra: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Our own loop, one process: per-step losses and the final model state (student, teacher, centres)."""
    train(_cfg(f"run.dir={run_dir}", *extra))
    losses = [r["loss"] for r in read_metrics(run_dir)]
    return losses, load_checkpoint(Checkpointer(run_dir).latest())["model"]


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


# 24 images of 8: 3 steps per epoch, so 4 steps cross an epoch boundary; the last layer frozen for the first epoch;
# KoLeo on (the demo recipe's regulariser, which the example adds to the loss itself).
EXAMPLE_RUN = ("data.builtin_size=24", "train.steps=4", "optim.freeze_last_layer_epochs=1", "loss.koleo_weight=0.1")


def test_pytorch_example_matches_our_loop(tmp_path):
    losses, state = run_ours(tmp_path / "ours", *EXAMPLE_RUN)
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "ibot_pytorch.py"), "--config", "", *TINY_OVERRIDES, *EXAMPLE_RUN,
         f"run.dir={tmp_path / 'example'}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [float(x) for x in re.findall(r"^step \d+/4 loss (\S+)", out.stdout, re.M)]
    assert printed == pytest.approx(losses, rel=1e-5)
    assert_same_state(load_file(tmp_path / "example" / "ibot_model.safetensors"), state)
