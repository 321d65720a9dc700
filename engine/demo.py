"""`ibot demo`: pretrain a ViT-tiny on the built-in patterns dataset and show that it learned something.

k-NN of the teacher's features before (random init) and after pretraining, the training throughput, and a
loss-curve PNG in the run directory. Runs on CPU (a few minutes on 2 cores) or on a GPU.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from engine.config import Config, save_config
from engine.plot import plot_run, read_metrics
from engine.train import train


def _eval_knn(argv: list[str], out: Path) -> dict:
    """`ibot eval knn ARGV --out OUT` through the command line entry (in process); its JSON result."""
    from engine.cli import main

    if main(["eval", "knn", *argv, "--out", str(out)]) != 0:
        raise RuntimeError(f"ibot eval knn {' '.join(argv)} failed")
    return json.loads(out.read_text())


def run_demo(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    if (run_dir / "metrics.jsonl").exists() and (run_dir / "config.yaml").exists():
        shutil.rmtree(run_dir)  # a previous demo run: start over so the numbers are this run's
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    save_config(cfg, cfg_path)
    start = time.perf_counter()
    print("== k-NN of the randomly initialised teacher (before pretraining)")
    before = _eval_knn(["--random-init", "--config", str(cfg_path)], run_dir / "knn_before.json")
    print(f"== pretraining {cfg.model.arch}/{cfg.model.patch_size} with iBOT")
    train(cfg)
    print("== k-NN of the pretrained teacher")
    after = _eval_knn(["--checkpoint", str(run_dir)], run_dir / "knn_after.json")
    png = plot_run(run_dir)
    rates = [r["img_per_s"] for r in read_metrics(run_dir)[1:]] or [0.0]
    print(
        f"\n== demo done in {time.perf_counter() - start:.0f} s\n"
        f"   throughput: {statistics.median(rates):.1f} img/s (median over log intervals)\n"
        f"   k-NN top-1 before: {before['top1']:.1f}%   after: {after['top1']:.1f}%   "
        f"(top-5 {before['top5']:.1f}% -> {after['top5']:.1f}%)\n"
        f"   loss curve: {png}\n   run directory: {run_dir}"
    )
    return {"before": before, "after": after}
