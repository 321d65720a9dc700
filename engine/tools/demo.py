"""`ibot demo`: pretrain a ViT-tiny on real scans (`builtin:digits`) and show that it learned something.

k-NN of the teacher's features before (random init) and after pretraining, beside the k-NN of random features (the
same ViT at random init without LayerScale, whose 1e-5 start gives every image nearly the same feature: a much
stronger baseline than the init), the training throughput, any collapse warning, and PNGs in the run directory: the
k-NN before and after with the random-features line (knn.png), the loss (loss.png) and the training health
(health.png). Runs on CPU (a few minutes on 2 cores) or on a GPU.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from ibot_engine.checkpoint import read_checkpoint
from ibot_engine.config import Config, save_config
from ibot_engine.distributed import init_distributed, teardown
from ibot_engine.eval.command import evaluate
from ibot_engine.eval.features import teacher_backbone
from ibot_engine.tools.plot import plot_health_run, plot_knn_run, plot_run, read_metrics
from ibot_engine.train.loop import train


def _teacher_knn(cfg: Config, state: dict[str, Any] | None, out: Path, checkpoint: str | None = None) -> dict:
    """What `ibot eval knn` gives with its defaults (`--random-init` when `state` is None, else `--checkpoint`):
    the k-NN of the teacher backbone on the built-in splits, its JSON result also written to `out`."""
    env = init_distributed()
    try:
        backbone = teacher_backbone(cfg, state, env.device)
        return evaluate("knn", cfg, backbone, env, out, checkpoint=checkpoint, precision="auto")
    finally:
        teardown()


def run_demo(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    if (run_dir / "metrics.jsonl").exists() and (run_dir / "config.yaml").exists():
        shutil.rmtree(run_dir)  # a previous demo run: start over so the numbers are this run's
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    save_config(cfg, cfg_path)
    start = time.perf_counter()
    print("== k-NN of the randomly initialised teacher (before pretraining)")
    before = _teacher_knn(cfg, None, run_dir / "knn_before.json")
    random_features = None
    if cfg.model.layerscale:
        print("== k-NN of random features (the same ViT at random init without LayerScale)")
        no_layerscale = copy.deepcopy(cfg)
        no_layerscale.model.layerscale = 0.0
        random_features = _teacher_knn(no_layerscale, None, run_dir / "knn_random_features.json")
    print(f"== pretraining {cfg.model.arch}/{cfg.model.patch_size} with iBOT")
    last = train(cfg)
    print("== k-NN of the pretrained teacher")
    state, trained_cfg, _ = read_checkpoint(run_dir)
    after = _teacher_knn(trained_cfg, state, run_dir / "knn_after.json", checkpoint=str(run_dir))
    png, knn_png, health_png = plot_run(run_dir), plot_knn_run(run_dir), plot_health_run(run_dir)
    rates = [r["img_per_s"] for r in read_metrics(run_dir)[1:] if "img_per_s" in r] or [0.0]
    print(
        f"\n== demo done in {time.perf_counter() - start:.0f} s\n"
        f"   throughput: {statistics.median(rates):.1f} img/s (median over log intervals)\n"
        f"   k-NN top-1 before: {before['top1']:.1f}%   after: {after['top1']:.1f}%   "
        f"(top-5 {before['top5']:.1f}% -> {after['top5']:.1f}%)\n"
        + (f"   random features (no LayerScale, untrained): {random_features['top1']:.1f}%\n" if random_features
           else "")
        + f"   collapse warnings: {'; '.join(last.get('collapse') or []) or 'none'}\n"
        f"   k-NN before/after (figure): {knn_png}\n   loss curve: {png}\n   training health: {health_png}\n"
        f"   run directory: {run_dir}"
    )
    return {"before": before, "after": after, "random_features": random_features}
