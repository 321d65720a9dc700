"""Loss and k-NN curves from `metrics.jsonl` to PNG, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_SERIES = (("loss", (31, 119, 180)), ("loss_cls", (255, 127, 14)), ("loss_patch", (44, 160, 44)))
KNN_SERIES = (("knn_top1", (214, 39, 40)), ("knn_top5", (148, 103, 189)))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], out: str | Path, title: str = "iBOT loss", size: tuple[int, int] = (800, 480),
                series: tuple[tuple[str, tuple[int, int, int]], ...] = _SERIES) -> Path:
    """Line plot of the `series` keys (default loss, loss_cls and loss_patch) against step."""
    records = [r for r in records if any(k in r for k, _ in series)]
    if not records:
        raise ValueError("no metrics to plot")
    W, H = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    steps = [r["step"] for r in records]
    values = [r[k] for r in records for k, _ in series if k in r]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(values)
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (value - y0) / (y1 - y0) * (H - top - bottom))

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        _, y = xy(x0, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((5, y - 6), f"{value:.2f}", fill="black", font=font)
        step = x0 + (x1 - x0) * i / 4
        x, _ = xy(step, y0)
        draw.line([x, H - bottom, x, H - bottom + 4], fill="black")
        draw.text((x - 10, H - bottom + 8), f"{step:.0f}", fill="black", font=font)
    draw.text((W // 2 - 20, H - 18), "step", fill="black", font=font)
    draw.text((left, 12), title, fill="black", font=font)
    for n, (key, colour) in enumerate(series):
        points = [xy(r["step"], r[key]) for r in records if key in r]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:  # markers: sparse series (k-NN every N steps) stay visible
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.line([W - right - 150, top + 12 + 16 * n, W - right - 120, top + 12 + 16 * n], fill=colour, width=3)
        draw.text((W - right - 112, top + 6 + 16 * n), key, fill="black", font=font)
    out = Path(out)
    img.save(out)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    return plot_curves(read_metrics(run_dir), out or Path(run_dir) / "loss.png", title=f"iBOT loss: {run_dir}")


def plot_knn_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """k-NN top-1 / top-5 (percent) against step, to RUN_DIR/knn.png; None when the run logged no k-NN."""
    records = [r for r in read_metrics(run_dir) if "knn_top1" in r]
    if not records:
        return None
    return plot_curves(records, out or Path(run_dir) / "knn.png", title=f"k-NN accuracy (%): {run_dir}",
                       series=KNN_SERIES)
