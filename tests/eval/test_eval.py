"""`ibot eval knn` / `ibot eval linear` on data of known structure, across 1 and 2 processes, k-NN during training
(`eval.knn_every`), and evaluation of released weights."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ibot_engine.checkpoint import Checkpointer
from ibot_engine.cli import main
from ibot_engine.config import ConfigError, config_to_dict, load_config
from ibot_engine.eval.linear import linear_probe
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.released import write_released
from ibot_engine.train.loop import train
from tests.helpers import TINY_OVERRIDES, read_metrics

ROOT = Path(__file__).resolve().parents[2]
KNN_LINE = re.compile(r"^k-NN top-1: \d+\.\d%  top-5: \d+\.\d%$", re.MULTILINE)
LINEAR_LINE = re.compile(r"^linear top-1: (\d+\.\d)%  top-5: (\d+\.\d)%$", re.MULTILINE)

# Four classes, each one fixed two-colour image (left / right halves): every copy of a class is the same image.
_CLASS_COLOURS = [((255, 0, 0), (0, 0, 255)), ((0, 255, 0), (255, 255, 0)), ((255, 255, 255), (0, 0, 0)),
                  ((128, 0, 128), (0, 200, 200))]


def _class_image(c: int) -> Image.Image:
    image = Image.new("RGB", (32, 32), _CLASS_COLOURS[c][0])
    image.paste(_CLASS_COLOURS[c][1], (16, 0, 32, 32))
    return image


def _folders(root: Path) -> tuple[Path, Path]:
    """train: 5 copies of each class image. val: 4 copies per class, one of which is filed under the next class,
    so exactly 12 of 16 val labels agree with the images: a correct k-NN (k=5) gets 75% top-1 and 100% top-4."""
    for c in range(4):
        for i in range(5):
            (root / "train" / f"class{c}").mkdir(parents=True, exist_ok=True)
            _class_image(c).save(root / "train" / f"class{c}" / f"{i}.png")
        for i in range(4):
            folder = root / "val" / f"class{(c + 1) % 4 if i == 0 else c}"
            folder.mkdir(parents=True, exist_ok=True)
            _class_image(c).save(folder / f"from{c}_{i}.png")
    return root / "train", root / "val"


@pytest.mark.parametrize(
    ("features", "extra"), [("cls", []), ("cls+patch", ["--precision", "bf16", "--num-workers", "2"])]
)
def test_knn_on_image_folders_gets_the_accuracy_of_their_labels(tmp_path, capsys, features, extra):
    train_dir, val_dir = _folders(tmp_path)
    out = tmp_path / "knn.json"
    argv = ["eval", "knn", "--random-init", *TINY_OVERRIDES, f"run.dir={tmp_path}", "--train", str(train_dir),
            "--val", str(val_dir), "--k", "5", "--batch-size", "7", "--features", features, "--out", str(out), *extra]
    assert main(argv) == 0
    assert KNN_LINE.search(capsys.readouterr().out).group(0) == "k-NN top-1: 75.0%  top-5: 100.0%"
    result = json.loads(out.read_text())
    assert (result["top1"], result["top5"], result["num_train"], result["num_val"]) == (75.0, 100.0, 20, 16)
    assert result["features"] == features


def test_knn_on_labelled_shards(tmp_path, capsys):
    train_dir, val_dir = _folders(tmp_path)
    for split, src in (("train", train_dir), ("val", val_dir)):
        assert main(["shards", "write", str(src), str(tmp_path / f"shards_{split}"), "--workers", "1",
                     "--max-count", "6"]) == 0  # several shards per split
    argv = ["eval", "knn", "--random-init", *TINY_OVERRIDES, "--train", str(tmp_path / "shards_train"),
            "--val", str(tmp_path / "shards_val"), "--k", "5", "--batch-size", "7", "--out", str(tmp_path / "k.json")]
    assert main(argv) == 0
    assert "k-NN top-1: 75.0%  top-5: 100.0%" in capsys.readouterr().out
    assert json.loads((tmp_path / "k.json").read_text())["num_val"] == 16


def test_eval_needs_labelled_folders(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    _class_image(0).save(flat / "a.png")
    argv = ["eval", "knn", "--random-init", *TINY_OVERRIDES, "--train", str(flat), "--val", str(flat)]
    assert main(argv) == 2
    assert "has no class sub-folders" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Linear probe


def _gaussian_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes at -1 / +1 along axis 0 with unit Gaussian noise in 8 dims: the Bayes rule (sign of x_0) gets
    Phi(1) = 84.13% right, and no classifier can do better."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g)
    x[:, 0] += 2.0 * y - 1.0
    return x, y


def test_linear_probe_reaches_the_bayes_accuracy_of_overlapping_gaussians():
    result = linear_probe(*_gaussian_classes(4000, 1), *_gaussian_classes(4000, 2), epochs=5)
    bayes = 100 * 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # 84.13
    assert abs(result["top1"] - bayes) < 2.0, result  # 4000 val samples: standard error 0.6 points
    assert result["top5"] == 100.0  # two classes
    assert set(result["holdout_top1_by_lr"]) == {str(lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)}


def test_linear_probe_separable_is_perfect_and_random_labels_are_chance():
    g = torch.Generator().manual_seed(0)
    centres = 3 * F.normalize(torch.randn(10, 32, generator=g), dim=1)
    y_train, y_val = torch.arange(10).repeat(30), torch.arange(10).repeat(10)
    x_train = centres[y_train] + 0.1 * torch.randn(300, 32, generator=g)
    x_val = centres[y_val] + 0.1 * torch.randn(100, 32, generator=g)
    assert linear_probe(x_train, y_train, x_val, y_val, epochs=5)["top1"] == 100.0

    x = torch.randn(3000, 16, generator=g)
    labels = torch.randint(0, 10, (3000,), generator=g)
    chance = linear_probe(x[:2000], labels[:2000], x[2000:], labels[2000:], epochs=3)
    assert abs(chance["top1"] - 10.0) < 4.0 and abs(chance["top5"] - 50.0) < 6.0


def test_eval_linear_command_on_image_folders(tmp_path, capsys):
    train_dir, val_dir = _folders(tmp_path)
    out = tmp_path / "linear.json"
    argv = ["eval", "linear", "--random-init", *TINY_OVERRIDES, "--train", str(train_dir), "--val", str(val_dir),
            "--epochs", "20", "--out", str(out)]
    assert main(argv) == 0
    top1, top5 = LINEAR_LINE.search(capsys.readouterr().out).groups()
    # Identical images per class: the probe fits them; the val set holds 12 of 16 correctly filed images.
    assert (float(top1), float(top5)) == (75.0, 100.0)
    assert json.loads(out.read_text())["lr"] in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Distributed extraction: 2 gloo processes give the features and result of 1 process

_FEATURES_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from ibot_engine.config import load_config
    from ibot_engine.distributed import init_distributed, teardown
    from ibot_engine.eval.datasets import build_eval_dataset
    from ibot_engine.eval.features import dataset_features, teacher_backbone

    out_dir, *overrides = sys.argv[1:]
    env = init_distributed()
    cfg = load_config(None, overrides)
    dataset = build_eval_dataset("builtin:shapes:train", cfg)
    feats, labels = dataset_features(teacher_backbone(cfg, None, env.device), dataset, image_size=32,
                                     batch_size=16, device=env.device, amp=None)
    if env.rank == 0:
        torch.save({"feats": feats, "labels": labels}, out_dir + "/feats.pt")
    teardown()
    """
)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
def test_two_process_extraction_equals_one_process(tmp_path, capsys):
    overrides = [*TINY_OVERRIDES, "data.builtin_size=97"]  # odd: rank 0 gets one image more than rank 1
    proc = _torchrun("-m", "ibot_engine", "eval", "knn", "--random-init", *overrides, "--batch-size", "16", "--out",
                     str(tmp_path / "knn.json"))
    assert len(KNN_LINE.findall(proc.stdout)) == 1  # rank 0 only
    script = tmp_path / "features.py"
    script.write_text(_FEATURES_SCRIPT)
    _torchrun(str(script), str(tmp_path), *overrides)

    one = tmp_path / "one.json"
    assert main(["eval", "knn", "--random-init", *overrides, "--batch-size", "16", "--out", str(one)]) == 0
    two, single = json.loads((tmp_path / "knn.json").read_text()), json.loads(one.read_text())
    assert (two["num_train"], two["num_val"]) == (97, 100)
    assert (two["top1"], two["top5"]) == (single["top1"], single["top5"])

    from ibot_engine.eval.datasets import build_eval_dataset
    from ibot_engine.eval.features import dataset_features, teacher_backbone

    cfg = load_config(None, overrides)
    dataset = build_eval_dataset("builtin:shapes:train", cfg)
    feats, labels = dataset_features(teacher_backbone(cfg, None, torch.device("cpu")), dataset, image_size=32,
                                     batch_size=16, device=torch.device("cpu"), amp=None)
    gathered = torch.load(tmp_path / "feats.pt", weights_only=True)
    assert gathered["labels"].tolist() == labels.tolist() == [dataset[i][1] for i in range(97)]
    torch.testing.assert_close(gathered["feats"], feats, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# During training


def test_knn_every_logs_knn_and_leaves_training_unchanged(tmp_path):
    base = [*TINY_OVERRIDES, "train.steps=4", "data.builtin_size=40"]
    train(load_config(None, [*base, f"run.dir={tmp_path / 'plain'}"]))
    train(load_config(None, [*base, f"run.dir={tmp_path / 'eval'}", "eval.knn_every=2", "eval.k=5",
                             "train.log_every=3"]))
    plain, evaluated = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "eval")
    # The random-init baseline at step 0, then log_every 3 plus the k-NN steps 2 and 4.
    assert [r["step"] for r in evaluated] == [0, 2, 3, 4]
    assert [("knn_top1" in r, "knn_top5" in r) for r in evaluated] == [(True, True), (True, True), (False, False),
                                                                       (True, True)]
    assert "loss" not in evaluated[0]  # the baseline record is the k-NN only
    evaluated = evaluated[1:]
    for r in evaluated:
        if "knn_top1" in r:
            assert 0.0 <= r["knn_top1"] <= r["knn_top5"] <= 100.0
    # Evaluation draws nothing from the training RNG streams: same losses as the run without it.
    by_step = {r["step"]: r["loss"] for r in plain}
    assert all(r["loss"] == by_step[r["step"]] for r in evaluated)

    # The k-NN record equals `ibot eval knn` on the same checkpoint and held-out set.
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "eval"), "--k", "5", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == evaluated[-1]["knn_top1"]

    assert main(["plot", str(tmp_path / "eval")]) == 0
    assert Image.open(tmp_path / "eval" / "knn.png").size == (800, 480)


_BASELINES = [f"knn_{name}_{top}" for name in ("random", "random_clspatch", "pixels") for top in ("top1", "top5")]


def _weighted_knn_by_hand(train_x, train_y, val_x, val_y, k: int, temperature: float) -> tuple[float, float]:
    """DINO's weighted k-NN (top-1, top-5 %) written out here: the k most cosine-similar rows vote exp(sim / T)."""
    sim_k, idx = (F.normalize(val_x, dim=1) @ F.normalize(train_x, dim=1).T).topk(k, dim=1)
    votes = torch.zeros(len(val_y), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], (sim_k / temperature).exp())
    hits = votes.topk(5, dim=1).indices == val_y[:, None]
    return 100.0 * hits[:, 0].sum().item() / len(val_y), 100.0 * hits.any(1).sum().item() / len(val_y)


def test_a_run_logs_the_knn_of_random_features_and_raw_pixels_and_its_lead_over_them(tmp_path, caplog):
    """Step 0 of a run with eval.knn_every holds the k-NN of random features (without the run's LayerScale 1e-5,
    which makes every image's feature nearly the same: not the init's k-NN) and of the raw pixels (equal to the
    k-NN of the resized, normalised images computed here); every k-NN step adds the teacher's cls+patch k-NN (equal to
    `ibot eval knn --features cls+patch`); the run ends with the teacher's lead over each baseline."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from ibot_engine.data.normalise import IMAGENET_MEAN, IMAGENET_STD
    from ibot_engine.eval.datasets import build_eval_dataset

    cfg = load_config(None, [*TINY_OVERRIDES, "data.path=builtin:patterns", "data.builtin_size=40", "train.steps=2",
                             "eval.knn_every=2", "eval.k=5", "model.layerscale=1e-5", f"run.dir={tmp_path}"])
    last = train(cfg)
    first = read_metrics(tmp_path)[0]
    assert first["step"] == 0 and all(0.0 <= first[key] <= 100.0 for key in _BASELINES)
    assert first["knn_random_top1"] != first["knn_top1"]

    def pixels(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = build_eval_dataset(spec, cfg)
        images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
        x = torch.stack([TF.resize(TF.pil_to_tensor(image), [32, 32], InterpolationMode.BICUBIC, antialias=True)
                         for image in images])
        x = TF.normalize(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
        return x.flatten(1), torch.tensor(labels)

    expected = _weighted_knn_by_hand(*pixels("builtin:patterns:train"), *pixels("builtin:patterns:val"), k=5,
                                     temperature=0.07)
    assert (first["knn_pixels_top1"], first["knn_pixels_top5"]) == expected

    out = tmp_path / "clspatch.json"
    assert main(["eval", "knn", "--checkpoint", str(tmp_path), "--k", "5", "--features", "cls+patch",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["top1"], result["top5"]) == (last["knn_clspatch_top1"], last["knn_clspatch_top5"])

    summary = last["baselines"]
    assert {key: summary[key] for key in _BASELINES} == {key: first[key] for key in _BASELINES}
    assert summary["beats_random"] == last["knn_top1"] - first["knn_random_top1"]
    assert summary["beats_random_clspatch"] == last["knn_clspatch_top1"] - first["knn_random_clspatch_top1"]
    assert summary["beats_pixels_clspatch"] == last["knn_clspatch_top1"] - first["knn_pixels_top1"]
    assert (f"teacher cls+patch {last['knn_clspatch_top1']:5.1f}%   random features "
            f"{first['knn_random_clspatch_top1']:.1f}% ({summary['beats_random_clspatch']:+.1f})") in caplog.text
    # The run warns exactly when the teacher does not beat random features.
    assert ("is no better than random features" in caplog.text) == (summary["beats_random"] <= 0)


def test_the_run_warns_when_its_knn_is_no_better_than_random_features(caplog):
    from ibot_engine.train.loop import _knn_summary

    first = {"knn_random_top1": 60.0, "knn_random_clspatch_top1": 58.0, "knn_pixels_top1": 90.0}
    for top1, warns in ((60.0, True), (55.0, True), (60.5, False)):
        caplog.clear()
        last = {"step": 100, "knn_top1": top1, "knn_clspatch_top1": 70.0}
        with caplog.at_level(logging.INFO, logger="ibot_engine.train.loop"):
            assert _knn_summary(last, first, "cls")["beats_random"] == top1 - 60.0
        assert ("is no better than random features" in caplog.text) == warns, top1


def test_random_features_are_the_runs_own_init_without_layerscale(tmp_path):
    """With model.layerscale=0 the random features are the run's initial teacher (its seed, train.seed=3)."""
    train(load_config(None, [*TINY_OVERRIDES, "data.path=builtin:patterns", "data.builtin_size=40", "train.steps=1",
                             "train.seed=3", "eval.knn_every=1", "eval.k=5", f"run.dir={tmp_path}"]))
    first = read_metrics(tmp_path)[0]
    assert {key: first[key.replace("_random", "")] for key in _BASELINES if "random" in key} == \
        {key: first[key] for key in _BASELINES if "random" in key}


def test_knn_every_needs_held_out_folders_for_folder_data(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.train"):
        load_config(None, [f"data.path={tmp_path}", "eval.knn_every=10"])



# ----------------------------------------------------------------------------------------------------------------
# Released weights: how good is the released model on my data before I train?


def test_knn_of_a_released_file_equals_the_knn_of_the_same_weights_as_our_checkpoint(tmp_path, capsys):
    """A DINOv2-layout file (the loaders' writer) of a run's teacher backbone gets the k-NN of that run's checkpoint
    on builtin:digits: the released path builds the same network at the file's native 32 px."""
    cfg = load_config(None, [*TINY_OVERRIDES, "data.path=builtin:digits", f"run.dir={tmp_path / 'run'}"])
    torch.manual_seed(0)
    model = IBOT(cfg.model, cfg.loss)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    Checkpointer(tmp_path / "run").save(1, {"step": 1, "model": model.state_dict(), "config": config_to_dict(cfg)})
    released = tmp_path / "dinov2_vitt8_pretrain.pth"
    write_released(model.teacher.backbone.state_dict(), cfg.model, released, "dinov2")

    ours = tmp_path / "ours.json"
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "run"), "--out", str(ours)]) == 0
    assert main(["eval", "knn", "--checkpoint", str(released), "--train", "builtin:digits:train",
                 "--val", "builtin:digits:val"]) == 0
    lines = KNN_LINE.findall(capsys.readouterr().out)
    result = json.loads((tmp_path / "dinov2_vitt8_pretrain_knn.json").read_text())  # next to the file by default
    assert (result["num_train"], result["num_val"]) == (1437, 360)
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    expected = json.loads(ours.read_text())
    assert (result["top1"], result["top5"]) == (expected["top1"], expected["top5"])
    assert lines[0] == lines[1]


def test_eval_of_a_released_file_at_another_size_and_its_errors(tmp_path, capsys):
    model_cfg = load_config(None, TINY_OVERRIDES).model
    torch.manual_seed(0)
    released = tmp_path / "vit.pth"
    write_released(IBOT(model_cfg, load_config().loss).teacher.backbone.state_dict(), model_cfg, released, "dinov2")
    train_dir, val_dir = _folders(tmp_path)
    out = tmp_path / "knn.json"
    # 64 px: the position embedding is resampled once to the 8 x 8 grid (a 4 x 4 one would fail at this size).
    argv = ["eval", "linear", "--checkpoint", str(released), "--train", str(train_dir), "--val", str(val_dir),
            "--img-size", "64", "--epochs", "2", "--out", str(out)]
    assert main(argv) == 0
    assert LINEAR_LINE.search(capsys.readouterr().out)
    assert json.loads(out.read_text())["checkpoint"] == str(released)

    for argv, needle in (
        (["eval", "knn", "--checkpoint", str(released)], "--train and --val are required"),
        (["eval", "knn", "--checkpoint", str(released), "--train", str(train_dir), "--val", str(val_dir),
          "--img-size", "30"], "--img-size 30 is not a positive multiple of the patch size 8"),
        (["eval", "knn", "--checkpoint", str(released), "--init-format", "dinov3", "--train", str(train_dir),
          "--val", str(val_dir)], "init_format=dinov3"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and str(released) in err, err
