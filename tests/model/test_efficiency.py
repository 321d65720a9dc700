"""The step's efficiency options give the same training math: activation checkpointing, stochastic depth on the kept
samples only, per-block torch.compile (with no recompiles across steps), and apex detection."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import ibot_engine.accel as accel
from ibot_engine.config import load_config
from ibot_engine.distributed import DistEnv
from ibot_engine.model.vit import Block, VisionTransformer, drop_add_subset
from ibot_engine.train.optim import apply_hyperparams, build_optimizer
from ibot_engine.train.schedules import hyperparams_at
from ibot_engine.train.step import train_step
from ibot_engine.train.trainer import build_trainer
from tests.helpers import TINY_OVERRIDES, tiny_config


def _grads_of(vit: VisionTransformer, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    g, m = torch.randn(4, 3, 32, 32, generator=gen), torch.rand(4, 4, 4, generator=gen) > 0.5
    vit.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the drop-path draws
    out = vit(g, m)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(mode):
    """With stochastic depth on: the recomputation must replay the forward's random draws."""
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, mask_token=True, drop_path=0.5).train()
    out_ref, grads_ref = _grads_of(vit, seed=7)
    for block in vit.blocks:
        block.checkpointing = mode
    out, grads = _grads_of(vit, seed=7)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_saves_fewer_tensors_for_backward():
    """full < selective < none, counted by the autograd saved-tensor hooks over one forward."""
    def saved_numel(mode: str) -> int:
        torch.manual_seed(0)
        vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32).train()
        for block in vit.blocks:
            block.checkpointing = mode
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vit(torch.randn(4, 3, 32, 32)).sum().backward()
        return total

    none, selective, full = saved_numel("none"), saved_numel("selective"), saved_numel("full")
    assert full < selective < none, (full, selective, none)


def test_subset_drop_path_equals_the_mask_formula_on_the_same_draw():
    """x + branch(x[kept]) * B / kept on the kept rows, x elsewhere; gradients reach only the kept samples."""
    torch.manual_seed(0)
    block = Block(16, 2, 4.0, drop_path=0.4, layerscale=0.0, drop_path_impl="subset").train()
    x = torch.randn(10, 5, 16, requires_grad=True)
    torch.manual_seed(11)
    out = drop_add_subset(x, block._mlp_branch, 0.4)
    out.sum().backward()
    torch.manual_seed(11)
    kept = torch.randperm(10)[: int(10 * 0.6)]
    scale = torch.zeros(10, 1, 1)
    scale[kept] = 10 / len(kept)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref + block._mlp_branch(x_ref) * scale
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(out[dropped], x[dropped])


def test_subset_drop_path_is_unbiased():
    torch.manual_seed(0)
    x = torch.zeros(8, 1, 1)
    mean = torch.stack([drop_add_subset(x, lambda t: torch.ones_like(t), 0.3) for _ in range(4000)]).mean()
    assert abs(mean.item() - 1.0) < 0.02


def test_training_runs_with_every_efficiency_option(tmp_path):
    from ibot_engine.train.loop import train

    for options in (["model.pack_crops=true", "train.activation_checkpointing=selective"],
                    ["model.drop_path_impl=subset", "train.activation_checkpointing=full"]):
        last = train(tiny_config(f"run.dir={tmp_path / options[0]}", "train.steps=2",
                                        *options))
        assert last["step"] == 2 and torch.isfinite(torch.tensor(last["loss"]))


def _steps(cfg, n: int, graphs: list[int] | None = None) -> list[float]:
    """Losses of the first `n` real training steps (`train_step`); `graphs` collects dynamo's graph count after each."""
    from torch._dynamo.utils import counters

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    t = build_trainer(cfg, env)
    ema_pairs, params = t.model.ema_pairs(), [p for p in t.model.student.parameters() if p.requires_grad]
    t.model.train()
    it, losses = iter(t.data), []
    for step in range(n):
        hp = hyperparams_at(step, cfg, t.total_steps, t.data.steps_per_epoch, 1)
        losses.append(train_step(t, next(it), hp, None, ema_pairs, params)[0].total.item())
        if graphs is not None:
            graphs.append(counters["stats"]["unique_graphs"])
    return losses


def test_compiled_blocks_give_the_eager_losses_without_recompiling(tmp_path):
    """Per-block compile (inductor on CPU): the same losses as eager over 3 steps whose masked-token counts differ,
    and no new graph after the first step (the heads are compiled with a symbolic masked-token count)."""
    from torch._dynamo.utils import counters

    overrides = [*TINY_OVERRIDES, f"run.dir={tmp_path}", "model.drop_path=0", "train.steps=3"]
    eager = _steps(load_config(None, overrides), 3)
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compiled = _steps(load_config(None, [*overrides, "train.compile=true"]), 3, graphs)
    assert graphs[0] > 0 and graphs[-1] == graphs[0], graphs
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)


def _fake_package(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def clean_apex(monkeypatch):
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, name)
    accel.nvidia_apex.cache_clear()
    accel._say_once.cache_clear()
    yield monkeypatch
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        del sys.modules[name]
    accel.nvidia_apex.cache_clear()
    accel._say_once.cache_clear()


def test_pypi_apex_is_detected_and_ignored(tmp_path, clean_apex, caplog):
    """The PyPI 'apex' (a web toolkit) imports as `apex` but has no apex.optimizers: warn, use torch's kernels."""
    _fake_package(tmp_path, {"apex/__init__.py": "'''Apex: a web application toolkit.'''\n"})
    clean_apex.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert accel.nvidia_apex() is None
        opt = build_optimizer(torch.nn.Linear(2, 2), load_config(None, ["optim.impl=apex"]).optim, torch.device("cpu"))
        build_optimizer(torch.nn.Linear(2, 2), load_config(None, ["optim.impl=apex"]).optim, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert "not NVIDIA apex" in caplog.text
    assert caplog.text.count("optim.impl=apex asked for") == 1  # said once


def test_nvidia_apex_is_used_where_it_can_run(tmp_path, clean_apex, caplog, tiny_cfg):
    """Dispatch only (a real apex build needs CUDA): a package with apex's module layout is picked up for the norm
    (its FusedLayerNorm runs torch's kernel on CPU tensors), while FusedAdam needs CUDA tensors."""
    _fake_package(tmp_path, {
        "apex/__init__.py": "",
        "apex/optimizers/__init__.py": """
            import torch
            class FusedAdam(torch.optim.AdamW):
                def __init__(self, params, adam_w_mode=True, **kw):
                    super().__init__(params, **kw)
        """,
        "apex/normalization/__init__.py": """
            import torch
            class FusedLayerNorm(torch.nn.LayerNorm):
                pass
        """,
    })
    clean_apex.syspath_prepend(str(tmp_path))
    assert accel.nvidia_apex() is not None
    from ibot_engine.model.ibot import IBOTNetwork

    net = IBOTNetwork(tiny_config("model.norm_impl=apex").model, student=True)
    assert type(net.backbone.blocks[0].norm1).__name__ == "FusedLayerNorm"
    assert type(net.backbone.norm).__name__ == "FusedLayerNorm"
    plain = IBOTNetwork(tiny_cfg.model, student=True)
    assert plain.state_dict().keys() == net.state_dict().keys()  # checkpoints move between the two
    with caplog.at_level(logging.WARNING):
        opt = build_optimizer(net, load_config(None, ["optim.impl=apex"]).optim, torch.device("cpu"))
    assert type(opt).__name__ == "AdamW" and "apex needs CUDA tensors" in caplog.text


@pytest.mark.gpu
def test_real_apex_fused_adam_matches_torch_adamw():
    if not torch.cuda.is_available() or accel.nvidia_apex() is None:
        pytest.skip("needs CUDA and NVIDIA apex")
    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 64).cuda(), torch.nn.Linear(64, 64).cuda()
    b.load_state_dict(a.state_dict())
    cfg = load_config(None, []).optim
    opt_a = build_optimizer(a, cfg, torch.device("cuda"))
    opt_b = build_optimizer(b, load_config(None, ["optim.impl=apex"]).optim, torch.device("cuda"))
    for opt in (opt_a, opt_b):
        apply_hyperparams(opt, lr=1e-2, weight_decay=0.04)
    x = torch.randn(8, 64, device="cuda")
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_fused_ops_benchmark_smoke_run_writes_its_report(tmp_path):
    """`python -m ibot_benchmarks.fused_ops --device cpu --quick` (run as a user runs it: tests import nothing from
    the benchmarks)."""
    out = tmp_path / "fused.md"
    run = subprocess.run([sys.executable, "-m", "ibot_benchmarks.fused_ops", "--device", "cpu", "--quick", "--out",
                          str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = out.read_text()
    assert "torch fused AdamW" in text and "torch LayerNorm" in text and "NVIDIA apex:" in text
