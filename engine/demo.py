"""`ibot demo`: pretrain a ViT-tiny on the built-in patterns dataset and show that it learned something.

k-NN of the teacher's features before (random init) and after pretraining, the training throughput, and a
loss-curve PNG in the run directory. Runs on CPU (a few minutes on 2 cores) or on a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from engine.config import Config, save_config
from engine.evaluate import knn_main
from engine.plot import plot_run, read_metrics
from engine.train import train


def _knn_args(cfg_path: Path, checkpoint: str | None, out: Path) -> argparse.Namespace:
    return argparse.Namespace(
        checkpoint=checkpoint, random_init=checkpoint is None, config=str(cfg_path) if checkpoint is None else None,
        overrides=[], train=None, val=None, k=20, temperature=0.07,
        batch_size=128, out=str(out),
    )


def run_demo(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    if (run_dir / "metrics.jsonl").exists() and (run_dir / "config.yaml").exists():
        shutil.rmtree(run_dir)  # a previous demo run: start over so the numbers are this run's
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    save_config(cfg, cfg_path)
    start = time.perf_counter()
    print("== k-NN of the randomly initialised teacher (before pretraining)")
    before = knn_main(_knn_args(cfg_path, None, run_dir / "knn_before.json"))
    print(f"== pretraining {cfg.model.arch}/{cfg.model.patch_size} with iBOT")
    train(cfg)
    print("== k-NN of the pretrained teacher")
    after = knn_main(_knn_args(cfg_path, str(run_dir), run_dir / "knn_after.json"))
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
