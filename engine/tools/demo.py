"""`ibot demo`: pretrain a ViT-tiny on real scans (`builtin:digits`) and show that it learned something.

The run measures it (`eval.knn_every`; when the config leaves it at 0, the demo sets it so that the k-NN runs at step
0 and at the last step): the k-NN of the teacher's features before (random init) and after pretraining, beside the
k-NN of random features (the same ViT at random init without LayerScale: the init itself with the small-data recipe,
a much stronger baseline than a LayerScale 1e-5 init, which gives every image nearly the same feature) and of the
raw pixels, all in metrics.jsonl
(engine/eval/knn.py). The demo prints them from there, with the training throughput and any collapse warning, writes
them as knn_before.json, knn_after.json and knn_random_features.json, and draws PNGs in the run directory: the k-NN
with the baselines' lines (knn.png), the loss (loss.png) and the training health (health.png). Runs on CPU (a few
minutes on 2 cores) or on a GPU.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from ibot_engine.config import Config, save_config
from ibot_engine.eval.knn import format_knn
from ibot_engine.tools.plot import plot_health_run, plot_knn_run, plot_run, read_metrics
from ibot_engine.train.loop import train


def _logged_knn(record: dict[str, Any], prefix: str, out: Path, title: str) -> dict[str, float]:
    """The k-NN `{prefix}_top1` / `_top5` of a metrics record, printed under `title` in the line `ibot eval knn`
    prints, and written to `out` (JSON)."""
    result = {"top1": record[f"{prefix}_top1"], "top5": record[f"{prefix}_top5"], "step": record["step"]}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"== {title}\n{format_knn(result)}")
    return result


def run_demo(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    if (run_dir / "metrics.jsonl").exists() and (run_dir / "config.yaml").exists():
        shutil.rmtree(run_dir)  # a previous demo run: start over so the numbers are this run's
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.eval.knn_every:
        cfg.eval.knn_every = cfg.train.steps or 10**9  # the k-NN at step 0 (with the baselines) and the last step
    save_config(cfg, run_dir / "config.yaml")
    start = time.perf_counter()
    print(f"== pretraining {cfg.model.arch}/{cfg.model.patch_size} with iBOT")
    last = train(cfg)
    first = read_metrics(run_dir)[0]  # step 0: the teacher at random init and the baselines
    before = _logged_knn(first, "knn", run_dir / "knn_before.json",
                         "k-NN of the randomly initialised teacher (before pretraining)")
    # Printed even when the ViT has no LayerScale (the small-data recipe): random features are then the init itself.
    random_features = _logged_knn(first, "knn_random", run_dir / "knn_random_features.json",
                                  "k-NN of random features (the same ViT at random init without LayerScale)")
    after = _logged_knn(last, "knn", run_dir / "knn_after.json", "k-NN of the pretrained teacher")
    png, knn_png, health_png = plot_run(run_dir), plot_knn_run(run_dir), plot_health_run(run_dir)
    rates = [r["img_per_s"] for r in read_metrics(run_dir)[1:] if "img_per_s" in r] or [0.0]
    print(
        f"\n== demo done in {time.perf_counter() - start:.0f} s\n"
        f"   throughput: {statistics.median(rates):.1f} img/s (median over log intervals)\n"
        f"   k-NN top-1 before: {before['top1']:.1f}%   after: {after['top1']:.1f}%   "
        f"(top-5 {before['top5']:.1f}% -> {after['top5']:.1f}%)\n"
        + f"   random features (no LayerScale, untrained): {random_features['top1']:.1f}%\n"
        + (f"   raw pixels: {first['knn_pixels_top1']:.1f}%\n" if "knn_pixels_top1" in first else "")
        + f"   collapse warnings: {'; '.join(last.get('collapse') or []) or 'none'}\n"
        f"   k-NN before/after (figure): {knn_png}\n   loss curve: {png}\n   training health: {health_png}\n"
        f"   run directory: {run_dir}"
    )
    return {"before": before, "after": after, "random_features": random_features}
