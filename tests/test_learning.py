"""Learning on real images: a short pretraining run on the built-in digits scans must make the features better.

The run is the demo itself (`engine/configs/demo_cpu.yaml` on the small-data recipe `small_data.yaml`: ViT-tiny/8
on 32 px crops of scikit-learn's handwritten-digit scans, 200 steps), about four minutes on 2 CPU cores (82.2% on
2026-12-07, random features 65.8%). It must

* beat random features by 10 points: the same ViT randomly initialised without LayerScale, whose features already
  separate digits well (the recipe has no LayerScale, so they are also the run's own step-0 k-NN; the run logs
  them at step 0 as `knn_random_top1`),
* have a cls term that teaches: after the first 10% of the steps the teacher's cls targets stay below 0.95 of ln K
  (uniform targets teach nothing) and carry information about the image, on average at least 0.02 of ln K
  (`teacher_cls_info_frac`; the demo: 0.07-0.15, mean 0.10). Row entropy alone is not enough: targets that
  are the same non-uniform distribution for every image have a low entropy and teach nothing (docs/learning.md),
* and train without a collapse warning (the detector watches the teacher's targets and the embedding spread).

Marked `slow` and `learning`; `.ci/run` runs it.

At 64 px (`launch/configs/digits.yaml`) the k-NN only climbs past random features after about 150 steps (training
first removes the ink-level signal that random features sort by; docs/learning.md), so no short run separates
learning from not by its k-NN. Two tests:

* `.ci/run` runs the first 30 steps (about 2 minutes) and checks the mechanism whose failure was recorded in every
  64 px run that did not learn: the teacher's cls targets must stay sharper than uniform (the former digits.yaml:
  0.97-0.999 of ln K), must not put the whole batch on one prototype (batch entropy over 0.3 of ln K; a lagging
  centre swung it to 0.00-0.06 of ln K within 20 steps: 40.3% k-NN after 300 steps against random features' 55.0%),
  must know the image and keep the cls embeddings spread (0.004-0.02 in the sweeps that ended at random features).
  The three seeds that learn keep the batch entropy at 0.61-0.86 and the spread at 0.044-0.055 over those steps.
  `python -m tests.test_learning` runs the same check on the recorded failing settings and shows that it fails.
* The full 300-step run (about 25 minutes on 2 cores, more than the default suite's budget) checks the k-NN itself:
  marked `slow` and `learning_64px`, outside `.ci/run`: `pytest -m learning_64px tests/test_learning.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ibot_engine.config import load_config
from ibot_engine.configs import DEMO_CONFIG
from ibot_engine.eval.features import teacher_backbone
from ibot_engine.eval.knn import knn_eval
from ibot_engine.model.vit import ARCHS
from ibot_engine.train.loop import train
from tests.helpers import read_metrics

DEMO = DEMO_CONFIG
DIGITS_64PX = Path(__file__).resolve().parent.parent / "launch" / "configs" / "digits.yaml"
STEPS = 200
STEPS_64PX_SHORT = 30

pytest.importorskip("sklearn", reason="builtin:digits needs scikit-learn (pip install -e '.[digits]')")


@pytest.mark.slow
@pytest.mark.learning
def test_pretraining_on_digits_learns_without_collapse(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(DEMO, [f"run.dir={tmp_path}", f"train.steps={STEPS}", f"eval.knn_every={STEPS}",
                             "train.log_every=10", "checkpoint.every=0"])
    last = train(cfg)
    records = read_metrics(tmp_path)
    assert records[0]["step"] == 0 and last["step"] == STEPS
    random_features, final = records[0]["knn_random_top1"], last["knn_top1"]
    # Checked here, not only logged: the random-features baseline of this run is the untrained ViT without LayerScale.
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layerscale=0.0))
    backbone = teacher_backbone(plain, None, torch.device("cpu"))
    assert knn_eval(backbone, plain, "builtin:digits:train", "builtin:digits:val")["top1"] == random_features
    health = [r for r in records if "teacher_cls_entropy_frac" in r]
    late = [r["teacher_cls_entropy_frac"] for r in health if r["step"] >= STEPS // 10]
    info = sum(r["teacher_cls_info_frac"] for r in health if r["step"] >= STEPS // 10) / len(late)
    summary = (f"k-NN top-1: random features {random_features:.1f}%, after {STEPS} steps {final:.1f}%; teacher cls "
               f"target entropy / ln K after 10% of the run: max {max(late):.3f}, information about the image / ln K: "
               f"mean {info:.3f}; warnings: {last['collapse']}")
    print(summary)
    assert final >= random_features + 10, summary
    assert max(late) < 0.95, summary
    assert info >= 0.02, summary
    assert last["collapse"] == [], summary
    spread = 0.5 / backbone.embed_dim**0.5  # half of random directions' 1 / sqrt(D): well away from collapse
    assert all(r["teacher_cls_std"] > spread and r["student_cls_std"] > spread for r in health[-3:]), summary


def check_64px_cls_targets(run_dir: Path, config: Path = DIGITS_64PX, *overrides: str) -> str:
    """The first STEPS_64PX_SHORT steps of the 64 px digits run (no k-NN); raises AssertionError unless the teacher's
    cls targets are neither uniform nor one prototype for the batch, carry information about the image and the cls
    embeddings stay spread, with no collapse warning. Returns the summary line."""
    cfg = load_config(config, [f"run.dir={run_dir}", f"train.steps={STEPS_64PX_SHORT}", "eval.knn_every=0",
                               "train.log_every=5", "checkpoint.every=0", *overrides])
    last = train(cfg)
    health = [r for r in read_metrics(run_dir) if "teacher_cls_entropy_frac" in r and r["step"] >= 10]
    row = [r["teacher_cls_entropy_frac"] for r in health]
    batch = [r["teacher_cls_batch_entropy_frac"] for r in health]
    info = sum(r["teacher_cls_info_frac"] for r in health) / len(health)
    spread = 0.5 / ARCHS[cfg.model.arch].embed_dim ** 0.5  # as in the 32 px test
    summary = (f"64 px, steps 10-{STEPS_64PX_SHORT}: teacher cls target entropy / ln K max {max(row):.3f}, batch "
               f"entropy / ln K min {min(batch):.3f}, information / ln K mean {info:.3f}, cls std at the end teacher "
               f"{health[-1]['teacher_cls_std']:.4f} student {health[-1]['student_cls_std']:.4f} (floor "
               f"{spread:.4f}); warnings: {last['collapse']}")
    assert last["step"] == STEPS_64PX_SHORT, summary
    assert max(row) < 0.95, summary  # not uniform
    assert min(batch) > 0.3, summary  # not one prototype for the whole batch
    assert info >= 0.02, summary  # the targets differ between images
    assert min(health[-1]["teacher_cls_std"], health[-1]["student_cls_std"]) > spread, summary
    assert last["collapse"] == [], summary
    return summary


@pytest.mark.slow
@pytest.mark.learning
def test_pretraining_at_64px_keeps_cls_targets_informative(tmp_path):
    print(check_64px_cls_targets(tmp_path))


@pytest.mark.slow
@pytest.mark.learning_64px
@pytest.mark.timeout(3600)
def test_pretraining_at_64px_beats_random_features(tmp_path):
    """Issue 30's 64 px check at seed 0: `launch/configs/digits.yaml` (the small-data recipe, digits at 64 px, 2 x 64 +
    4 x 32 px crops, K = 1024, batch 64, 300 steps) ends 10 points above random features (measured 2026-12-07:
    66.1% against 55.0%; seeds 1 / 2: 68.1 / 74.2% against 56.9 / 61.4%; docs/learning.md), its cls targets carry
    information about the image and no warning fires."""
    cfg = load_config(DIGITS_64PX, [f"run.dir={tmp_path}", "eval.knn_every=300", "train.log_every=10"])
    last = train(cfg)
    records = read_metrics(tmp_path)
    random_features, final = records[0]["knn_random_top1"], last["knn_top1"]
    health = [r for r in records if "teacher_cls_info_frac" in r and r["step"] >= cfg.train.steps // 10]
    info = sum(r["teacher_cls_info_frac"] for r in health) / len(health)
    summary = (f"64 px k-NN top-1: random features {random_features:.1f}%, after {last['step']} steps {final:.1f}%; "
               f"cls target information / ln K after 10% of the run: mean {info:.3f}; warnings: {last['collapse']}")
    print(summary)
    assert last["step"] == 300, summary
    assert final >= random_features + 10, summary
    assert info >= 0.02, summary
    assert last["collapse"] == [], summary


if __name__ == "__main__":
    # The short 64 px check must fail on the recorded settings that did not learn at 64 px. Run on 2026-12-07; about
    # 2 minutes each on 2 cores: python -m tests.test_learning [OUT]
    import subprocess
    import sys
    import tempfile

    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    former = out / "digits_4ec1d2e.yaml"  # the former digits.yaml: LayerScale, lightly's optimisation
    former.write_text(subprocess.run(["git", "show", "4ec1d2e:launch/configs/digits.yaml"], check=True,
                                     capture_output=True, text=True, cwd=DIGITS_64PX.parents[2]).stdout)
    for name, config, overrides in (("recipe", DIGITS_64PX, ()),
                                    ("lagging_centre", DIGITS_64PX, ("loss.center_momentum=0.9",)),
                                    ("former_digits_yaml", former, ())):
        try:
            print(f"{name}: passes: {check_64px_cls_targets(out / name, config, *overrides)}")
        except AssertionError as e:
            print(f"{name}: FAILS: {e}")
