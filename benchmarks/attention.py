"""Attention backends compared: the op alone and the whole student backbone, packed and unpacked crops.

    python -m ibot_benchmarks.attention                      # CUDA: ViT-S/16 and ViT-B/16, B = 64, bf16
    python -m ibot_benchmarks.attention --device cpu --quick --out /tmp/attention.md        # smoke run of the script

Part 1 (op): fwd+bwd of attention alone on the iBOT crop recipe, 2 x 224 px (197 tokens) and 10 x 96 px (37 tokens)
per image, head dim 64: one call per resolution for each unpacked backend (sdpa auto / cudnn / flash / efficient /
math, xformers, flex) and one call over the packed tokens for flex (block-diagonal mask) and xformers
(BlockDiagonalMask).
Part 2 (backbone): fwd+bwd of the student ViT on the same crops under bf16 autocast, for each `model.attention`
with `model.pack_crops` off and on, eager and with per-block torch.compile: the comparison that picks the default.
The fastest backbone row is named at the end. Backends that cannot run here are listed with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import torch

from ibot_benchmarks.common import bench
from ibot_engine.bench.report import command_line, environment, header_lines, markdown_table, save_report
from ibot_engine.model.attention import ATTENTION_BACKENDS, SDPA_BACKENDS, attend, check_attention, make_packing
from ibot_engine.model.vit import ARCHS, VisionTransformer

log = logging.getLogger("ibot_benchmarks.attention")


def _crops(quick: bool) -> tuple[int, int, int, int, int]:
    """(B, global px, local px, patch, local views)."""
    return (2, 64, 32, 16, 10) if quick else (64, 224, 96, 16, 10)


def op_rows(arch: str, device: str, dtype: torch.dtype, quick: bool) -> list[list[str]]:
    a = ARCHS[arch]
    B, gpx, lpx, patch, L = _crops(quick)
    tg, tl = (gpx // patch) ** 2 + 1, (lpx // patch) ** 2 + 1
    groups = ((2 * B, tg), (L * B, tl))
    S = sum(n * t for n, t in groups)
    qkv = torch.randn(S, 3 * a.embed_dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(S, a.embed_dim, device=device, dtype=dtype)
    rows = []
    cases = [(f"sdpa:{k}", "sdpa", k, False) for k in SDPA_BACKENDS]
    cases += [("xformers", "xformers", "auto", False), ("flex", "flex", "auto", False)]
    cases += [("flex packed", "flex", "auto", True), ("xformers packed", "xformers", "auto", True)]
    for label, backend, kernel, packed in cases:
        try:
            check_attention(backend, kernel, torch.device(device))
            if backend == "flex" and device == "cpu":
                raise RuntimeError("FlexAttention has no CPU backward")
            packing = make_packing(groups, backend, torch.device(device)) if packed else None

            def fn(backend=backend, kernel=kernel, packing=packing):
                if packing is not None:
                    out = attend(qkv, a.num_heads, backend, kernel, packing)
                else:  # one call per resolution on row views, as the unpacked model runs them
                    out, start = [], 0
                    for n, t in groups:
                        rows_ = qkv[start : start + n * t].view(n, t, -1)
                        out.append(attend(rows_, a.num_heads, backend, kernel).reshape(n * t, -1))
                        start += n * t
                    out = torch.cat(out)
                out.backward(grad)

            fn()  # compile / autotune outside the timing
            t = bench(fn, device, grad_to_none=[qkv], quick=quick)
            rows.append([arch, label, f"{t.median_ms:.3f} ({t.p20_ms:.3f}-{t.p80_ms:.3f})", ""])
        except Exception as err:
            rows.append([arch, label, "n/a", str(err).splitlines()[0][:120]])
        log.info("op %s %s: %s", arch, label, rows[-1][2])
    return rows


def backbone_rows(arch: str, device: str, quick: bool, compiled: bool) -> list[tuple[str, float | None, str]]:
    B, gpx, lpx, patch, L = _crops(quick)
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    g = torch.randn(2 * B, 3, gpx, gpx, device=device)
    loc = torch.randn(L * B, 3, lpx, lpx, device=device)
    masks = torch.rand(2 * B, gpx // patch, gpx // patch, device=device) < 0.3
    out = []
    for backend in ATTENTION_BACKENDS:
        for pack in (False, True):
            label = f"{backend}{' packed' if pack else ''}{' compiled' if compiled else ''}"
            try:
                check_attention(backend, "auto", torch.device(device))
                if backend == "flex" and device == "cpu":
                    raise RuntimeError("FlexAttention has no CPU backward")
                torch.manual_seed(0)
                vit = VisionTransformer(arch, patch_size=patch, img_size=gpx, drop_path=0.1, mask_token=True,
                                        attention=backend).to(device).train()
                if compiled:
                    for block in vit.blocks:
                        block.compile()

                def fn(vit=vit, pack=pack):
                    with amp:
                        if pack:
                            tg, tl = vit.forward_packed([(g, masks), (loc, None)])
                        else:
                            tg, tl = vit(g, masks), vit(loc)
                        loss = tg.float().square().mean() + tl.float().square().mean()
                    loss.backward()

                for _ in range(2):
                    fn()
                t = bench(fn, device, grad_to_none=list(vit.parameters()), quick=quick)
                out.append((label, t.median_ms, f"{B / (t.median_ms * 1e-3):.0f}"))
            except Exception as err:
                out.append((label, None, str(err).splitlines()[0][:120]))
            log.info("backbone %s %s: %s", arch, label, out[-1][1])
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (a smoke test)")
    parser.add_argument("--archs", default="vit_small,vit_base")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled backbone rows")
    parser.add_argument("--out", type=Path, help="markdown report (default results/attention_<gpu>_<yyyymm>.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    archs = ["vit_tiny"] if args.quick else args.archs.split(",")
    B, gpx, lpx, patch, L = _crops(args.quick)
    env = environment(args.device, command_line("python -m ibot_benchmarks.attention", argv))
    parts = header_lines("Attention backends", env)
    parts += [f"- crops per image: 2 x {gpx} px + {L} x {lpx} px, patch {patch}, B = {B}, {str(dtype)[6:]}", ""]
    op = [row for arch in archs for row in op_rows(arch, args.device, dtype, args.quick)]
    parts += ["## Attention op, fwd+bwd (ms, median and p20-p80)", ""]
    parts += [markdown_table(["arch", "backend", "ms", "why n/a"], op), ""]
    parts += ["## Student backbone fwd+bwd (bf16 autocast on CUDA)", ""]
    table, best = [], {}
    for arch in archs:
        for compiled in (False, True) if not args.no_compile else (False,):
            for label, ms, note in backbone_rows(arch, args.device, args.quick, compiled):
                table.append([arch, label, "n/a" if ms is None else f"{ms:.2f}", note])
                if ms is not None and (arch not in best or ms < best[arch][1]):
                    best[arch] = (label, ms)
    parts += [markdown_table(["arch", "attention", "ms", "img/s or why n/a"], table), ""]
    parts += [f"- fastest for {arch}: **{label}** ({ms:.2f} ms)" for arch, (label, ms) in best.items()]
    if args.device != "cuda":
        parts += ["", "CPU run: a smoke test of the script, not a measurement."]
    return save_report("\n".join(parts) + "\n", "attention", args.device, args.out, args.quick)


if __name__ == "__main__":
    main()
