"""The command line end to end on a tiny config: train, eval knn, plot, demo, and config errors."""

from __future__ import annotations

import json
import re

from PIL import Image

from ibot_engine.cli import main
from tests.helpers import TINY_OVERRIDES

KNN_LINE = re.compile(r"^k-NN top-1: \d+\.\d%  top-5: \d+\.\d%$", re.MULTILINE)


def test_train_eval_knn_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_OVERRIDES, f"run.dir={run}", "train.steps=2"]) == 0
    assert main(["eval", "knn", "--checkpoint", str(run), "--batch-size", "32"]) == 0
    assert KNN_LINE.search(capsys.readouterr().out)
    result = json.loads((run / "checkpoints" / "knn.json").read_text())
    assert result["train"] == "builtin:shapes:train" and 0 <= result["top1"] <= 100
    assert main(["plot", str(run)]) == 0
    assert Image.open(run / "loss.png").size == (800, 480)


def test_demo_prints_knn_before_and_after(tmp_path, capsys):
    run = tmp_path / "demo"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.path")]
    assert main(["demo", *overrides, f"run.dir={run}", "train.steps=2", "data.path=builtin:patterns"]) == 0
    out = capsys.readouterr().out
    assert len(KNN_LINE.findall(out)) == 3  # before, random features (always printed), after
    assert re.search(r"k-NN top-1 before: [\d.]+%   after: [\d.]+%", out)
    assert re.search(r"random features \(no LayerScale, untrained\): [\d.]+%", out) and "collapse warnings:" in out
    assert (run / "loss.png").is_file() and (run / "health.png").is_file()
    assert (run / "knn.png").is_file() and re.search(r"k-NN before/after \(figure\): \S+knn\.png", out)
    assert (run / "knn_before.json").is_file() and (run / "knn_random_features.json").is_file()


def test_config_error_exit_code(capsys):
    assert main(["train", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
