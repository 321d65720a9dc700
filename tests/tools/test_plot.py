"""`ibot plot` and the demo's figures: PNGs of the stated size from a metrics.jsonl, the demo's k-NN before / after
and random-features line drawn where they belong, legends outside the axes (off the data), round tick values."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from ibot_engine.tools.plot import (
    HEALTH_PANELS,
    curves_figure,
    health_figure,
    knn_figure,
    plot_health_run,
    plot_knn_run,
    plot_run,
    read_demo_knn,
    read_metrics,
)

STEPS = 60
DEMO = {"before": 7.5, "after": 79.4, "random_features": 65.8}


def _write_run(run_dir, *, knn_every: int | None = 20, demo: bool = True) -> None:
    """A metrics.jsonl shaped like the loop's (a record every 5 steps, k-NN every `knn_every` from step 0, the
    health keys with a NaN patch entropy as a run without masked patches logs it) and the demo's k-NN results."""
    health_keys = [k for _, keys in HEALTH_PANELS for k in keys]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(0, STEPS + 1, 5):
            record = {"step": step}
            if step:
                record.update(loss=11.0 - math.log(step), loss_cls=6.0 - 0.5 * math.log(step),
                              loss_patch=5.0 - 0.5 * math.log(step), img_per_s=40.0)
                record.update({k: 0.5 + 0.01 * i for i, k in enumerate(health_keys)})
                record["teacher_patch_entropy_frac"] = float("nan")
            if knn_every and step % knn_every == 0:
                record.update(knn_top1=10.0 + step, knn_top5=40.0 + step / 2)
            f.write(json.dumps(record) + "\n")
    if demo:
        for name, top1 in (("knn_before", DEMO["before"]), ("knn_after", DEMO["after"]),
                           ("knn_random_features", DEMO["random_features"])):
            (run_dir / f"{name}.json").write_text(json.dumps({"top1": top1, "top5": 90.0}))


def _is_round_step(step: float) -> bool:
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m) for m in (1.0, 2.0, 2.5, 5.0))


def test_plot_commands_write_pngs(tmp_path):
    _write_run(tmp_path)
    assert plot_run(tmp_path) == tmp_path / "loss.png"
    assert plot_knn_run(tmp_path) == tmp_path / "knn.png"
    assert plot_health_run(tmp_path) == tmp_path / "health.png"
    for name, size in (("loss", (800, 480)), ("knn", (800, 480)), ("health", (800, 900))):
        with Image.open(tmp_path / f"{name}.png") as png:
            assert png.format == "PNG" and png.size == size, name
            assert len(png.convert("L").getcolors(maxcolors=1 << 16)) > 20, f"{name}.png is blank"


def test_knn_figure_shows_the_demo_before_after_and_random_features(tmp_path):
    _write_run(tmp_path, knn_every=None)  # the demo: no k-NN in metrics.jsonl, only its three JSON results
    assert read_demo_knn(tmp_path) == DEMO
    ax = knn_figure(read_metrics(tmp_path), read_demo_knn(tmp_path)).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    ends = lines["top-1 before / after pretraining"]
    assert list(ends.get_xdata()) == [0, STEPS] and list(ends.get_ydata()) == [DEMO["before"], DEMO["after"]]
    (baseline,) = [line for label, line in lines.items() if label.startswith("random features")]
    assert baseline.get_linestyle() == "--" and set(baseline.get_ydata()) == {DEMO["random_features"]}
    assert "65.8%" in baseline.get_label()
    assert [t.get_text() for t in ax.texts] == ["before: 7.5%", "after: 79.4%"]
    # An ordinary run that logged no k-NN has no k-NN figure; one with neither kind of result is an error.
    (tmp_path / "plain").mkdir()
    _write_run(tmp_path / "plain", knn_every=None, demo=False)
    assert plot_knn_run(tmp_path / "plain") is None
    with pytest.raises(ValueError, match="no k-NN results"):
        knn_figure(read_metrics(tmp_path / "plain"))


def test_knn_figure_draws_the_baselines_logged_at_step_0(tmp_path):
    _write_run(tmp_path, demo=False)
    records = read_metrics(tmp_path)
    records[0].update(knn_random_top1=41.5, knn_pixels_top1=63.0)  # as a run with eval.knn_every logs them
    # An older demo's random-features result in the same directory gives way to the logged one: one line each.
    ax = knn_figure(records, {"random_features": 99.0}).axes[0]
    baselines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("knn_")}
    assert list(baselines) == ["random features, untrained\n(no LayerScale): 41.5%", "raw pixels: 63.0%"]
    random_line, pixels_line = baselines.values()
    assert set(random_line.get_ydata()) == {41.5} and set(pixels_line.get_ydata()) == {63.0}
    assert random_line.get_linestyle() != pixels_line.get_linestyle()
    assert list(random_line.get_xdata()) == [0, 1]  # axes coordinates: across the whole run


def test_legends_are_off_the_data_and_ticks_are_round(tmp_path):
    _write_run(tmp_path)
    records, demo = read_metrics(tmp_path), read_demo_knn(tmp_path)
    figures = {"loss": curves_figure(records), "knn": knn_figure(records, demo), "health": health_figure(records)}
    assert len(figures["health"].axes) == len(HEALTH_PANELS)
    for name, fig in figures.items():
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)  # lays out the figure (constrained layout) as savefig does
        for ax in fig.axes:
            legend = ax.get_legend().get_window_extent(renderer)
            for other in fig.axes:
                assert not legend.overlaps(other.get_window_extent(renderer)), f"{name}: legend over an axes"
            assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1), \
                f"{name}: legend cut off by the figure's edge"
            for axis, (low, high), ticks in (("x", ax.get_xlim(), ax.get_xticks()),
                                             ("y", ax.get_ylim(), ax.get_yticks())):
                ticks = [t for t in ticks if low <= t <= high]
                step = ticks[1] - ticks[0]
                assert len(ticks) >= 3 and _is_round_step(step), f"{name}: {axis} ticks {ticks}"
                assert all(math.isclose(t / step, round(t / step), abs_tol=1e-6) for t in ticks), f"{name}: {ticks}"


def test_plot_run_names_the_missing_series(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "knn_top1": 9.0}) + "\n")
    with pytest.raises(ValueError, match="no values of loss, loss_cls, loss_patch"):
        plot_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is .* a run directory"):
        plot_run(tmp_path / "missing")
