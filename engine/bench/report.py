"""Results files: the one header every report opens with, where reports go, and the `ibot bench` report itself.

`ibot bench`, `ibot profile` and every `benchmarks/*.py` script describe their run with `environment()` (card,
date, torch / triton / CUDA / Python versions, git commit, command) and open their report with `header_lines()`.

Looked up from the current directory, not from this file, so that an installed package works as well as an editable
checkout (benchmarks and `ibot bench` are run from the clone):
* git: the commit of the git work tree the command runs in, with `-dirty` when it has uncommitted changes;
  `unknown` outside a work tree or without git.
* results: `./benchmarks/results`, created by the first report written there.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ibot_engine.bench.timing import BenchRow
from ibot_engine.config import Config, config_to_dict


def results_dir() -> Path:
    """`benchmarks/results` under the current directory: where reports go unless told otherwise."""
    return Path.cwd() / "benchmarks" / "results"


def git_sha(cwd: str | Path | None = None) -> str:
    """Short commit of the git work tree at `cwd` (default: the current directory), `-dirty` with uncommitted
    changes, `unknown` outside a work tree or without git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=cwd,
                              timeout=30).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    """The card's name on CUDA; on CPU the processor and the number of torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device | str) -> str:
    """Short card name for file names: 'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    words = [w for w in device_name(device).lower().replace("-", " ").split() if w not in {"nvidia", "geforce"}]
    return words[0] if words else "gpu"


def command_line(program: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run: `program` (e.g. 'python -m ibot_benchmarks.kernels') and `argv`
    (default: this process's arguments), shell-quoted."""
    return shlex.join([*program.split(), *(sys.argv[1:] if argv is None else argv)])


def environment(device: torch.device | str, command: str) -> dict[str, str]:
    """What a result depends on, in the order every report prints it: card, date, versions, git commit, command.

    Args:
        device: the device the run measured.
        command: the command line that reproduces the run (`command_line`).

    Returns:
        Keys card, date, torch, triton, cuda, python, git, command; string values.
    """
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "card": device_name(device),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "n/a (CPU run)",
        "python": platform.python_version(),
        "git": git_sha(),
        "command": command,
    }


def header_lines(title: str, env: dict[str, str], *, table: bool = False) -> list[str]:
    """The first lines of a report: `# title`, then `env` (`environment()` plus any keys of the report's own)
    one key per line (in a table, the command in backticks).

    The benchmark scripts write `- key: value` lines; `ibot bench` and `ibot profile` (`table=True`), whose reports
    continue with key / value tables of their config, write the same keys as a two-column table.
    """
    if table:  # in backticks: a table cell would otherwise render the command's markdown characters
        value = {k: f"`{v}`" if k == "command" else str(v) for k, v in env.items()}
        return [f"# {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in value.items())]
    return [f"# {title}", "", *(f"- {k}: {v}" for k, v in env.items())]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: `header`, then one line per row (cells through `str`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def default_report_path(what: str, device: torch.device | str) -> Path:
    """`results_dir()/<what>_<card>_<yyyymm>.md`."""
    return results_dir() / f"{what}_{device_slug(device)}_{datetime.datetime.now(datetime.UTC):%Y%m}.md"


def save_report(report: str, what: str, device: torch.device | str, out: Path | None, quick: bool) -> Path | None:
    """Print a benchmark script's `report` and write it to `out`, or to `default_report_path` for a full CUDA run;
    a CPU or --quick run without `out` is a smoke test and never lands in the results folder."""
    print(report)
    if out is None and torch.device(device).type == "cuda" and not quick:
        out = default_report_path(what, device)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The `ibot bench` report


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
    for section, keys in speed.items():  # the kernels and memory options (docs/kernels.md, "Speed and memory options")
        for key in keys:
            out[f"{section}.{key}"] = d[section][key]
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def results_table(rows: Sequence[BenchRow]) -> str:
    header = ["step", "batch", "img/s", "step ms median", "p10 / p90", "min / max", "peak GiB", "GFLOP/img",
              "TFLOP/s", "MFU", "data wait"]
    return markdown_table(header, [
        [r.name, r.batch_size, _fmt(r.img_per_s, ".1f"), _fmt(r.step_ms_median, ".2f"),
         f"{r.step_ms_p10:.2f} / {r.step_ms_p90:.2f}", f"{r.step_ms_min:.2f} / {r.step_ms_max:.2f}",
         _fmt(r.peak_memory_gib, ".2f"), _fmt(r.gflop_per_img, ".2f"), _fmt(r.achieved_tflops, ".3g"),
         "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%", f"{100 * r.data_wait_share:.1f}%"] for r in rows])


def default_out_path(cfg: Config, device: torch.device) -> Path:
    """`results_dir()/bench_<arch><patch>_b<batch>_<card>_<yyyymmdd>.md`."""
    day = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    name = f"bench_{cfg.model.arch}{cfg.model.patch_size}_b{cfg.train.batch_size}_{device_slug(device)}_{day}.md"
    return results_dir() / name


def write_report(path: Path, *, env_info: dict[str, str], cfg: Config, rows: Sequence[BenchRow],
                 extra: dict[str, Any], notes: Sequence[str]) -> Path:
    """The markdown report at `path` and its JSON sidecar (same name, .json) with the raw numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [*header_lines("ibot bench", env_info, table=True), "",
             "Config (resolved, the keys that set the step's cost):", "",
             markdown_table(["key", "value"], list(relevant_config(cfg).items())), "",
             "## Result", "", results_table(rows), ""]
    lines += [f"- {key}: {value}" for key, value in extra.items()]
    lines += [f"- {note}" for note in notes]
    path.write_text("\n".join(lines) + "\n")
    sidecar = {"environment": env_info, "command": env_info["command"], "config": config_to_dict(cfg),
               "rows": [asdict(r) for r in rows], **extra, "notes": list(notes)}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return path
