"""The `ibot bench` report: environment, the config keys that set the step's cost, results table; markdown + JSON."""

from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ibot_engine.bench.timing import BenchRow
from ibot_engine.config import Config, config_to_dict

REPO_ROOT = Path(__file__).resolve().parents[2]


def environment(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {
        "card": card,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "n/a (CPU run)",
        "python": platform.python_version(),
        "git": sha,
    }


def relevant_config(cfg: Config) -> dict[str, Any]:
    """The config keys that decide the step's cost (and any attention / kernel settings the config has)."""
    d = config_to_dict(cfg)
    model = d["model"]
    out = {
        "model.arch": model["arch"], "model.patch_size": model["patch_size"], "model.out_dim (K)": model["out_dim"],
        "model.head_hidden_dim": model["head_hidden_dim"], "model.head_bottleneck_dim": model["head_bottleneck_dim"],
        "train.batch_size": d["train"]["batch_size"], "train.compile": d["train"]["compile"],
        "data.global_size": d["data"]["global_size"], "data.num_global": d["data"]["num_global"],
        "data.local_size": d["data"]["local_size"], "data.num_local": d["data"]["num_local"],
        "mask.variant": d["mask"]["variant"], "loss.patch_center": d["loss"]["patch_center"],
        "loss.centering": d["loss"]["centering"], "optim.clip_mode": d["optim"]["clip_mode"],
        "precision": d["precision"], "distributed.strategy": d["distributed"]["strategy"],
    }
    speed = {"model": ("attention", "sdpa_backend", "pack_crops", "drop_path_impl", "norm_impl", "drop_path"),
             "optim": ("impl",), "train": ("compile_mode", "activation_checkpointing")}
    for section, keys in speed.items():  # the kernels and memory options (README "Speed and memory options")
        for key in keys:
            out[f"{section}.{key}"] = d[section][key]
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def results_table(rows: Sequence[BenchRow]) -> str:
    header = ["step", "batch", "img/s", "step ms median", "p10 / p90", "min / max", "peak GiB", "GFLOP/img",
              "TFLOP/s", "MFU", "data wait"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r.name, str(r.batch_size), _fmt(r.img_per_s, ".1f"), _fmt(r.step_ms_median, ".2f"),
                 f"{r.step_ms_p10:.2f} / {r.step_ms_p90:.2f}", f"{r.step_ms_min:.2f} / {r.step_ms_max:.2f}",
                 _fmt(r.peak_memory_gib, ".2f"), _fmt(r.gflop_per_img, ".2f"), _fmt(r.achieved_tflops, ".3g"),
                 "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%", f"{100 * r.data_wait_share:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_out_path(cfg: Config, device: torch.device) -> Path:
    slug = "cpu"
    if device.type == "cuda":
        words = [w for w in torch.cuda.get_device_name(device).lower().replace("-", " ").split()
                 if w not in {"nvidia", "geforce"}]
        slug = words[0] if words else "gpu"
    day = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    name = f"bench_{cfg.model.arch}{cfg.model.patch_size}_b{cfg.train.batch_size}_{slug}_{day}.md"
    return REPO_ROOT / "benchmarks" / "results" / name


def write_report(path: Path, *, env_info: dict[str, str], command: str, cfg: Config, rows: Sequence[BenchRow],
                 extra: dict[str, Any], notes: Sequence[str]) -> Path:
    """The markdown report at `path` and its JSON sidecar (same name, .json) with the raw numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# ibot bench", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env_info.items()]
    lines += ["", "Command:", "", f"    {command}", "", "Config (resolved, the keys that set the step's cost):", ""]
    lines += ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in relevant_config(cfg).items()]
    lines += ["", "## Result", "", results_table(rows), ""]
    for key, value in extra.items():
        lines.append(f"- {key}: {value}")
    lines += [f"- {note}" for note in notes]
    path.write_text("\n".join(lines) + "\n")
    sidecar = {"environment": env_info, "command": command, "config": config_to_dict(cfg),
               "rows": [asdict(r) for r in rows], **extra, "notes": list(notes)}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return path
