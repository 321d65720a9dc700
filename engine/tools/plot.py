"""Loss and k-NN curves from `metrics.jsonl` to PNG, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_SERIES = (("loss", (31, 119, 180)), ("loss_cls", (255, 127, 14)), ("loss_patch", (44, 160, 44)))
KNN_SERIES = (("knn_top1", (214, 39, 40)), ("knn_top5", (148, 103, 189)))
# Training health (engine/health.py), three panels: the teacher's targets, the spread of the embeddings, the centres.
HEALTH_PANELS = (
    ("teacher targets (1 = uniform)", (("teacher_cls_entropy_frac", (31, 119, 180)),
                                       ("teacher_patch_entropy_frac", (44, 160, 44)),
                                       ("teacher_cls_batch_entropy_frac", (23, 190, 207)),
                                       ("teacher_cls_max_prob", (255, 127, 14)),
                                       ("teacher_patch_max_prob", (188, 189, 34)))),
    ("std of the unit cls embeddings over the batch (0 = collapse)", (("student_cls_std", (214, 39, 40)),
                                                                      ("teacher_cls_std", (148, 103, 189)))),
    ("centre norms", (("cls_center_norm", (140, 86, 75)), ("patch_center_norm", (127, 127, 127)))),
)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], out: str | Path, title: str = "iBOT loss", size: tuple[int, int] = (800, 480),
                series: tuple[tuple[str, tuple[int, int, int]], ...] = _SERIES) -> Path:
    """Line plot of the `series` keys (default loss, loss_cls and loss_patch) against step."""
    records = [r for r in records if any(k in r and math.isfinite(r[k]) for k, _ in series)]
    if not records:
        raise ValueError("no metrics to plot")
    W, H = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    steps = [r["step"] for r in records]
    values = [r[k] for r in records for k, _ in series if k in r and math.isfinite(r[k])]
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
        draw.text((5, y - 6), f"{value:.3g}", fill="black", font=font)
        step = x0 + (x1 - x0) * i / 4
        x, _ = xy(step, y0)
        draw.line([x, H - bottom, x, H - bottom + 4], fill="black")
        draw.text((x - 10, H - bottom + 8), f"{step:.0f}", fill="black", font=font)
    draw.text((W // 2 - 20, H - 18), "step", fill="black", font=font)
    draw.text((left, 12), title, fill="black", font=font)
    for n, (key, colour) in enumerate(series):
        points = [xy(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:  # markers: sparse series (k-NN every N steps) stay visible
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend = W - right - 45 - 6 * max(len(k) for k, _ in series)  # the default font is ~6 px per character
        draw.line([legend, top + 12 + 16 * n, legend + 30, top + 12 + 16 * n], fill=colour, width=3)
        draw.text((legend + 38, top + 6 + 16 * n), key, fill="black", font=font)
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


def plot_health_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """The training-health metrics against step, three panels stacked, to RUN_DIR/health.png; None when the run
    logged none."""
    records = read_metrics(run_dir)
    panels = []
    for title, series in HEALTH_PANELS:
        if any(k in r for r in records for k, _ in series):
            panels.append(Image.open(plot_curves(records, Path(run_dir) / ".health_panel.png", title=title,
                                                 size=(800, 300), series=series)).copy())
    (Path(run_dir) / ".health_panel.png").unlink(missing_ok=True)
    if not panels:
        return None
    sheet = Image.new("RGB", (800, 300 * len(panels)), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (0, 300 * i))
    out = Path(out or Path(run_dir) / "health.png")
    sheet.save(out)
    return out
