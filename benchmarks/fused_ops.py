"""torch's fused AdamW and LayerNorm against NVIDIA apex's FusedAdam and FusedLayerNorm, in the same run.

    python -m ibot_benchmarks.fused_ops                         # CUDA: ViT-S/16 and ViT-B/16 parameter sets and tokens
    python -m ibot_benchmarks.fused_ops --device cpu --quick --out /tmp/fused_ops.md      # smoke run of the script

Rows: one optimizer step over the student's real parameter list (the iBOT decay / no-decay groups, gradients set),
and LayerNorm fwd+bwd over one step's tokens (2 x 197 + 10 x 37 per image, B = 64) at the model width, bf16 on
CUDA. apex rows appear only when NVIDIA apex is importable with its CUDA extensions (`ibot_engine.accel.nvidia_apex`);
otherwise the report says so and keeps torch's rows. The faster of each pair is named: it is what
`optim.impl` / `model.norm_impl` should default to on that card.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ibot_benchmarks.common import bench
from ibot_engine.accel import fused_adam, nvidia_apex
from ibot_engine.bench.report import command_line, environment, header_lines, markdown_table, save_report
from ibot_engine.config import load_config
from ibot_engine.model.ibot import IBOTNetwork
from ibot_engine.train.optim import apply_hyperparams, build_optimizer, param_groups

log = logging.getLogger("ibot_benchmarks.fused_ops")


def optimizer_rows(arch: str, device: str, quick: bool) -> list[tuple[str, str, float]]:
    overrides = [f"model.arch={arch}"] + (["model.out_dim=256", "model.head_hidden_dim=128"] if quick else [])
    cfg = load_config(None, overrides)
    net = IBOTNetwork(cfg.model, student=True).to(device)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in net.parameters())
    # What the training loop builds: optim.impl=torch (fused AdamW), and apex's FusedAdam where it can run.
    makers = {"torch fused AdamW": lambda: build_optimizer(net, cfg.optim, torch.device(device))}
    if nvidia_apex() is not None and device == "cuda":
        makers["apex FusedAdam"] = lambda: fused_adam(param_groups(net), cfg.optim.betas)
    rows = []
    for name, make in makers.items():
        opt = make()
        apply_hyperparams(opt, lr=1e-4, weight_decay=0.04)
        t = bench(opt.step, device, quick=quick)
        rows.append((f"{arch} AdamW step ({numel / 1e6:.1f} M params)", name, t.median_ms))
    return rows


def layernorm_rows(arch: str, device: str, quick: bool) -> list[tuple[str, str, float]]:
    from ibot_engine.model.vit import ARCHS

    dim = ARCHS[arch].embed_dim
    tokens = 2 * 2 * 5 + 2 * 10 * 2 if quick else 64 * (2 * 197 + 10 * 37)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    layers = {"torch LayerNorm": torch.nn.LayerNorm(dim, eps=1e-6)}
    if nvidia_apex() is not None and device == "cuda":
        layers["apex FusedLayerNorm"] = nvidia_apex().normalization.FusedLayerNorm(dim, eps=1e-6)
    rows = []
    for name, layer in layers.items():
        layer = layer.to(device=device, dtype=dtype)

        def fn(layer=layer):
            layer(x).backward(grad)

        t = bench(fn, device, grad_to_none=[x, *layer.parameters()], quick=quick)
        rows.append((f"{arch} LayerNorm fwd+bwd ({tokens} x {dim}, {str(dtype)[6:]})", name, t.median_ms))
    return rows


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (a smoke test)")
    parser.add_argument("--out", type=Path, help="markdown report (default results/fused_ops_<gpu>_<yyyymm>.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    archs = ["vit_tiny"] if args.quick else ["vit_small", "vit_base"]
    rows = [r for arch in archs for r in optimizer_rows(arch, args.device, args.quick)]
    rows += [r for arch in archs for r in layernorm_rows(arch, args.device, args.quick)]
    env = environment(args.device, command_line("python -m ibot_benchmarks.fused_ops", argv))
    parts = header_lines("Fused AdamW and LayerNorm, torch vs apex", env)
    apex_state = "installed" if nvidia_apex() is not None else "not installed (torch rows only)"
    parts += [f"- NVIDIA apex: {apex_state}", ""]
    parts += [markdown_table(["case", "implementation", "median ms"], [[c, n, f"{ms:.3f}"] for c, n, ms in rows]), ""]
    for case in dict.fromkeys(c for c, _, _ in rows):
        best = min((r for r in rows if r[0] == case), key=lambda r: r[2])
        parts.append(f"- {case}: fastest **{best[1]}**")
    if args.device != "cuda":
        parts += ["", "CPU run: a smoke test of the script, not a measurement."]
    return save_report("\n".join(parts) + "\n", "fused_ops", args.device, args.out, args.quick)


if __name__ == "__main__":
    main()
