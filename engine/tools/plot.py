"""Loss, k-NN and training-health curves of a run, from `metrics.jsonl` to PNG with matplotlib.

Figures are built on `matplotlib.figure.Figure` and saved through the Agg canvas: no pyplot, so no display is needed
and the caller's own matplotlib backend is left alone. Legends sit to the right of the axes, off the data; tick values
come from matplotlib's locators (round numbers). The k-NN figure draws the baselines a run logs at step 0 as horizontal
lines (`knn_random_top1`: random features; `knn_pixels_top1`: raw pixels; engine/eval/knn.py), and the one-off
results of older demo run directories (before and after pretraining, random features) where metrics.jsonl lacks them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LOSS_SERIES = ("loss", "loss_cls", "loss_patch")
KNN_SERIES = ("knn_top1", "knn_top5")
# Training health (the checks in health.py), three panels: the teacher's targets, the spread of the embeddings, the
# centres.
HEALTH_PANELS = (
    ("teacher targets (entropies / ln K: 1 = uniform;\ninformation about the image / ln K: 0 = none)",
     ("teacher_cls_entropy_frac", "teacher_patch_entropy_frac", "teacher_cls_batch_entropy_frac",
      "teacher_cls_info_frac", "teacher_cls_max_prob", "teacher_patch_max_prob")),
    ("std of the unit cls embeddings over the batch (0 = collapse)", ("student_cls_std", "teacher_cls_std")),
    ("centre norms", ("cls_center_norm", "patch_center_norm")),
)
# Step-0 baselines drawn as horizontal lines: (metrics key, demo result standing in for it, label, style).
KNN_BASELINES = (("knn_random_top1", "random_features", "random features, untrained\n(no LayerScale)", "grey", "--"),
                 ("knn_pixels_top1", None, "raw pixels", "tab:brown", "-."))
# The demo's k-NN results (engine/tools/demo.py writes them next to metrics.jsonl).
DEMO_KNN_FILES = {"before": "knn_before.json", "after": "knn_after.json",
                  "random_features": "knn_random_features.json"}
_DPI = 100
_SIZE = (8.0, 4.8)  # inches: 800 x 480 px at _DPI
_HEALTH_SIZE = (8.0, 9.0)
_MARKERS_BELOW = 30  # a series with fewer points (k-NN every N steps, a short run) also gets a marker per point


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, one dict per logged step, in order.

    Raises:
        FileNotFoundError: the run directory has no metrics.jsonl.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_demo_knn(run_dir: str | Path) -> dict[str, float]:
    """The demo's k-NN top-1 results (percent) found in RUN_DIR, keyed "before", "after", "random_features"."""
    found = {}
    for name, filename in DEMO_KNN_FILES.items():
        path = Path(run_dir) / filename
        if path.is_file():
            found[name] = float(json.loads(path.read_text())["top1"])
    return found


def _points(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _new_figure(size: tuple[float, float], rows: int = 1) -> tuple[Figure, list]:
    # Constrained layout makes room for the legends placed outside the axes instead of shrinking them into the data.
    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        # Steps are integers: no 0.25-step ticks on short runs, and tick spacings of 1, 2 or 5 times a power of ten.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[-1].set_xlabel("step")
    return fig, list(axes)


def _draw_series(ax, records: list[dict], keys: tuple[str, ...]) -> int:
    """Draws each key that has finite values as a line against step; returns how many were drawn."""
    drawn = 0
    for key in keys:
        steps, values = _points(records, key)
        if steps:
            ax.plot(steps, values, label=key, linewidth=1.8, marker="o" if len(steps) < _MARKERS_BELOW else None,
                    markersize=4)
            drawn += 1
    return drawn


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, fontsize=9)


def curves_figure(records: list[dict], title: str = "iBOT loss", series: tuple[str, ...] = LOSS_SERIES,
                  ylabel: str = "loss") -> Figure:
    """One axes with the `series` keys of `records` against step, its legend to the right of the axes.

    Raises:
        ValueError: no record has a finite value for any of the keys.
    """
    fig, (ax,) = _new_figure(_SIZE)
    if not _draw_series(ax, records, series):
        raise ValueError(f"no values of {', '.join(series)} to plot")
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    _legend_outside(ax)
    return fig


def knn_figure(records: list[dict], demo: dict[str, float] | None = None, title: str = "k-NN accuracy") -> Figure:
    """k-NN accuracy (percent) against step: the k-NN logged during training (`eval.knn_every`), the step-0 baselines
    (KNN_BASELINES) as horizontal lines and, from `demo` where the records lack them, top-1 before pretraining (at
    step 0) and after (at the last step), joined by a line, and the random-features top-1.

    Raises:
        ValueError: neither the records nor `demo` hold a k-NN result.
    """
    demo = demo or {}
    fig, (ax,) = _new_figure(_SIZE)
    drawn = _draw_series(ax, records, KNN_SERIES)
    last = max((r["step"] for r in records), default=1)
    logged = any("knn_top1" in r for r in records)  # the demo's before / after are this curve's ends
    ends = [(name, step, demo[name]) for name, step in (("before", 0), ("after", last)) if name in demo and not logged]
    if ends:
        # Dotted: only the two ends were measured, the straight line between them is no curve.
        ax.plot([s for _, s, _ in ends], [v for _, _, v in ends], color="black", linewidth=1.5, linestyle=":",
                marker="o", markersize=8, label="top-1 before / after pretraining")
        for name, step, value in ends:
            ax.annotate(f"{name}: {value:.1f}%", (step, value), textcoords="offset points", xytext=(0, 9),
                        ha="left" if name == "before" else "right", fontsize=9)
        drawn += 1
    for key, demo_name, label, color, style in KNN_BASELINES:
        value = next((r[key] for r in records if key in r), demo.get(demo_name))
        if value is not None:
            ax.axhline(value, color=color, linestyle=style, linewidth=1.5, label=f"{label}: {value:.1f}%")
            drawn += 1
    if not drawn:
        raise ValueError("no k-NN results to plot (knn_top1 in metrics.jsonl or the demo's knn_*.json)")
    ax.set_ylim(0, 105)  # the whole 0-100% scale: how far a result is from chance and from perfect reads at a glance
    ax.set_title(title, fontsize=11)
    ax.set_ylabel("k-NN accuracy (%)")
    _legend_outside(ax)
    return fig


def health_figure(records: list[dict], title: str = "training health") -> Figure | None:
    """The training-health metrics against step, one axes per panel of HEALTH_PANELS that has data, stacked; None
    when the records hold none."""
    panels = [(name, keys) for name, keys in HEALTH_PANELS if any(_points(records, k)[0] for k in keys)]
    if not panels:
        return None
    fig, axes = _new_figure(_HEALTH_SIZE, rows=len(panels))
    fig.suptitle(title, fontsize=11)
    for ax, (name, keys) in zip(axes, panels, strict=True):
        _draw_series(ax, records, keys)
        ax.set_title(name, fontsize=10)
        _legend_outside(ax)
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    fig.savefig(out, dpi=_DPI)
    return out


def plot_curves(records: list[dict], out: str | Path, title: str = "iBOT loss",
                series: tuple[str, ...] = LOSS_SERIES, ylabel: str = "loss") -> Path:
    """`curves_figure` saved to `out` (PNG, 800 x 480 px); returns `out`."""
    return _save(curves_figure(records, title, series, ylabel), out)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """loss, loss_cls and loss_patch against step, to RUN_DIR/loss.png (or `out`)."""
    return plot_curves(read_metrics(run_dir), out or Path(run_dir) / "loss.png", title=f"iBOT loss: {run_dir}")


def plot_knn_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """k-NN top-1 / top-5 (percent) against step, with the step-0 baselines and the results of an older demo run
    directory (`knn_figure`), to RUN_DIR/knn.png; None when the run has no k-NN result."""
    records = read_metrics(run_dir)
    demo = read_demo_knn(run_dir)
    if not demo and not any("knn_top1" in r for r in records):
        return None
    return _save(knn_figure(records, demo, title=f"k-NN accuracy on held-out images: {run_dir}"),
                 out or Path(run_dir) / "knn.png")


def plot_health_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """The training-health metrics against step, three panels stacked, to RUN_DIR/health.png; None when the run
    logged none."""
    fig = health_figure(read_metrics(run_dir), title=f"training health: {run_dir}")
    return None if fig is None else _save(fig, out or Path(run_dir) / "health.png")
