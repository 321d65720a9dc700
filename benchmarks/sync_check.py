"""The host-sync rule on a real device: training steps under `HostSyncGuard` (engine/train/sync_guard.py) and, on
CUDA, `torch.cuda.set_sync_debug_mode("error")`, for each loss variant; a markdown report of what passed.

    python -m ibot_benchmarks.sync_check --out /tmp/sync.md                 # CUDA when available
    python -m ibot_benchmarks.sync_check --device cpu --quick               # the guard alone (what CI tests)

The config is the demo's ViT-tiny at 32 px on built-in data (the rule does not depend on the model's size), in
bf16 on CUDA (fp32 on CPU); fp16 is not checked: its GradScaler reads the overflow flag on the host by design.
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
from pathlib import Path

import torch

from ibot_engine.bench.report import command_line, environment, header_lines, markdown_table, save_report
from ibot_engine.config import load_config
from ibot_engine.configs import DEMO_CONFIG
from ibot_engine.distributed import DistEnv
from ibot_engine.train.sync_guard import guarded_steps

VARIANTS = {"centre": [], "sinkhorn": ["loss.centering=sinkhorn"], "koleo": ["loss.koleo_weight=0.1"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the default variant only")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = DistEnv(0, 1, 0, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in list(VARIANTS.items())[: 1 if args.quick else None]:
            cfg = load_config(DEMO_CONFIG, [
                "data.path=builtin:shapes", "data.builtin_size=256", f"run.dir={tmp}/{name}",
                f"precision={'bf16' if device.type == 'cuda' else 'fp32'}", "data.num_workers=2", *overrides])
            try:
                loss = guarded_steps(cfg, env, steps=args.steps, cuda_sync_debug=device.type == "cuda")
                rows.append([name, "no host sync", f"{loss:.4f}"])
            except Exception as err:  # the first sync found (HostSyncError or CUDA's), reported, then the next
                rows.append([name, f"`{type(err).__name__}: {err}`".replace("|", "/"), "-"])
                traceback.print_exc()
    env = environment(args.device, command_line("python -m ibot_benchmarks.sync_check", argv))
    lines = [*header_lines("Host syncs in the training step", env),
             "", f"{args.steps} steps per variant, each `train_step` under `HostSyncGuard`"
             + (" and `torch.cuda.set_sync_debug_mode('error')`" if device.type == "cuda" else "") + ".", "",
             markdown_table(["variant", "result", "last loss"], rows), ""]
    save_report("\n".join(lines), "sync_check", args.device, args.out, args.quick)


if __name__ == "__main__":
    main()
