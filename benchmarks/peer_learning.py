"""Learning on real images, ours against lightly's iBOT example: same data, same number of steps, same k-NN.

    python -m ibot_benchmarks.peer_learning          # 300 steps each -> results/peer_learning_cpu<N>core_<yyyymm>.md
    python -m ibot_benchmarks.peer_learning --steps 60 --out /tmp/p.md
    python -m ibot_benchmarks.peer_learning --quick --out /tmp/p.md   # smoke: a few steps, no claim
    python -m ibot_benchmarks.peer_learning --seed 0 1 2 3   # both sides per seed, and the means (~25 min a run here)
    python -m ibot_benchmarks.peer_learning --only lightly --swap data --stop-after 100 --knn-every 50 --out /tmp/b.md
        # bisection: lightly's loop fed by our data stream and masks (--swap init: from our ViT's init)
    python -m ibot_benchmarks.peer_learning --only ours --ours-init lightly --knn-every 50 --out /tmp/c.md
        # bisection: our engine from lightly's initial weights (with --swap data above: the same start and stream);
        # --set KEY=VALUE changes our recipe (e.g. --set optim.decay_all=true --set model.drop_path_uniform=true)

Data: `builtin:digits` (scikit-learn's 1,797 handwritten-digit scans, 64 x 64 RGB, 1,437 train / 360 val).
k-NN protocol for both, at random init and after training: the teacher backbone's cls token after its final norm,
L2-normalised, weighted k-NN (k = 20, T = 0.07) with the train split as memory and the val split as queries, images
resized to 64 px (`ibot_engine.eval.knn`).

* lightly: its iBOT example (lightly 1.6, `examples/pytorch/ibot.py`, built by `ibot_engine.bench.lightly_example`)
  changed only in size, as a user would run it on this data: timm ViT-tiny patch 8 at 64 px (LayerScale 1e-5, MAE
  init as the example's wrapper does), K = 1024, `IBOTTransform(global_crop_size=64, local_crop_size=32,
  n_local_views=4)` on a torchvision `ImageFolder`, batch 64, its own schedules over the run's steps (teacher
  temperature 0.04 -> 0.07 over 30/50 of them, weight decay 0.04 -> 0.4, EMA 0.992 -> 1, AdamW at a constant 1e-3),
  its block masks, its teacher head drawn apart from the student's.
* ours: `ibot train --config launch/configs/digits.yaml` (the 64 px small-data recipe) for the same steps, the same
  architecture, crop sizes, K and batch.

The report records the machine, versions, command, both k-NN figures at init and after training, the wall time
and the final training-health metrics of both runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ibot_benchmarks.common import repo_file
from ibot_engine.bench.lightly_example import (
    LightlyExample,
    block_masks,
    example_losses,
    example_optimizer,
    example_transform,
    lightly_example_step,
    ours_state_from_lightly,
    peer_versions,
)
from ibot_engine.bench.report import command_line, environment, header_lines, markdown_table, results_dir, save_report
from ibot_engine.checkpoint import read_checkpoint
from ibot_engine.config import load_config
from ibot_engine.data.digits import digits_folder
from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.stream import build_data_stream
from ibot_engine.eval.features import extract_features, teacher_backbone
from ibot_engine.eval.knn import weighted_knn
from ibot_engine.model.ibot import IBOT
from ibot_engine.model.released import to_timm
from ibot_engine.tools.export import backbone_state
from ibot_engine.train.loop import train

RECIPE = "launch/configs/digits.yaml"  # ours: the repository's 64 px recipe (`repo_file`)


# ----------------------------------------------------------------------------------------------------------------
# The two runs


def knn_top1(backbone: Any) -> float:
    """The k-NN protocol of this benchmark (see the module docstring): top-1 in percent."""
    train_set, val_set = ImageFolderDataset(digits_folder("train")), ImageFolderDataset(digits_folder("val"))
    train_x, train_y = extract_features(backbone, train_set, image_size=64, batch_size=256)
    val_x, val_y = extract_features(backbone, val_set, image_size=64, batch_size=256)
    return weighted_knn(train_x, train_y, val_x, val_y, k=20, temperature=0.07)["top1"]


class _Encode(torch.nn.Module):
    """lightly's backbone as a `forward(images) -> tokens` module for `extract_features`."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.encode(images)


def lightly_draw(seed: int) -> LightlyExample:
    """lightly's example model as `run_lightly` draws it at `seed` (its initial weights): ViT-tiny/8 at 64 px,
    K = 1024, the example's head widths and drop path."""
    torch.manual_seed(seed)
    random.seed(seed)  # lightly's block masks draw from Python's random
    return LightlyExample(arch="vit_tiny", patch_size=8, img_size=64, out_dim=1024)


def _load_our_backbones(peer: LightlyExample, recipe_cfg: Any) -> None:
    """Bisection: our ViT's initial weights (the recipe's init, drawn by our `IBOT`) in place of timm's / lightly's
    in both of the peer's backbones (keys through `to_timm`); the heads stay lightly's."""
    ours = IBOT(recipe_cfg.model, recipe_cfg.loss).state_dict()
    for side, backbone in (("student", peer.student_backbone), ("teacher", peer.teacher_backbone)):
        backbone.vit.load_state_dict(to_timm(backbone_state(ours, side)))
    peer.student_backbone.mask_token.data.copy_(ours["student.backbone.mask_token"].reshape(1, 1, -1))


def run_lightly(steps: int, *, workers: int, seed: int = 0, log_every: int = 50, knn_every: int = 0,
                swap: frozenset[str] = frozenset(), stop_after: int | None = None) -> dict[str, Any]:
    """lightly's example for `steps` steps (its schedules span them). For bisection, `swap` puts pieces of ours into
    its loop: "data" feeds it our multi-crop stream and block masks (the recipe's), "init" starts its backbones
    from our ViT's init; `stop_after` ends the run early (the schedules still span `steps`)."""
    import torchvision

    peer = lightly_draw(seed)
    recipe = load_config(repo_file(RECIPE), [f"data.num_workers={workers}"])
    if "init" in swap:
        _load_our_backbones(peer, recipe)
    init = knn_top1(_Encode(peer.teacher_backbone))
    if "data" in swap:
        stream = build_data_stream(recipe.data, recipe.mask, batch_size=64, patch_size=8, seed=seed,
                                   device=torch.device("cpu"))
    else:
        dataset = torchvision.datasets.ImageFolder(str(digits_folder("train")),
                                                   transform=example_transform(64, 32, num_local=4))
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True,
                                             num_workers=workers)

    def epoch() -> Any:
        """One pass of (global views [2B], local views [4B], block masks [2B, 8, 8])."""
        if "data" in swap:
            return ((b.global_crops, b.local_crops, b.masks) for b in stream)
        return ((torch.cat(views[:2]), torch.cat(views[2:]), block_masks(2 * 64, 8)) for views, _ in loader)

    dino, ibot_patch = example_losses(1024)
    optimizer = example_optimizer(peer)
    warmup = int(30 / 50 * steps)  # the example: 30 of its 50 epochs
    last = min(steps, stop_after or steps)
    peer.train()
    start, step, losses, curve = time.perf_counter(), 0, [], {0: init}
    while step < last:
        for global_views, local_views, block_mask in epoch():
            out = lightly_example_step(peer, optimizer, dino, ibot_patch, global_views, local_views, block_mask,
                                       step=step, total_steps=steps, warmup_steps=warmup, health=True)
            step += 1
            if step % log_every == 0 or step == last:
                losses.append({"step": step, "loss_cls": float(out["loss_cls"]),
                               "loss_patch": float(out["loss_patch"]),
                               **{k: out["health"][k] for k in ("teacher_cls_entropy_frac", "teacher_cls_std")}})
                print(f"lightly step {step}/{steps}: {losses[-1]}", flush=True)
            if knn_every and step % knn_every == 0 and step < last:
                curve[step] = knn_top1(_Encode(peer.teacher_backbone))
                print(f"lightly step {step}/{steps}: k-NN top-1 {curve[step]:.1f}%", flush=True)
                peer.train()
            if step == last:
                break
    seconds = time.perf_counter() - start
    curve[last] = knn_top1(_Encode(peer.teacher_backbone))
    return {"init": init, "final": curve[last], "curve": curve, "seconds": seconds, "losses": losses,
            "health": {k: losses[-1][k] for k in ("teacher_cls_entropy_frac", "teacher_cls_std")}}


def run_ours(steps: int, *, workers: int, run_dir: Path, knn_every: int = 0, seed: int = 0,
             init_from_lightly: bool = False, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Our recipe for `steps` steps. For bisection, `init_from_lightly` starts it from lightly's example's initial
    weights at this seed (the draw `run_lightly` makes), so that the two runs share their start, and `overrides`
    (`key=value`) change the recipe."""
    cfg = load_config(repo_file(RECIPE), [f"train.steps={steps}", f"run.dir={run_dir}", f"data.num_workers={workers}",
                               "checkpoint.every=0", "checkpoint.resume=none", f"eval.knn_every={knn_every}",
                               f"train.seed={seed}", *overrides])
    initial = ours_state_from_lightly(lightly_draw(seed), IBOT(cfg.model, cfg.loss)) if init_from_lightly else None
    init = knn_top1(teacher_backbone(cfg, initial, torch.device("cpu")))
    # A stronger baseline than the init (whose LayerScale 1e-5 gives every image nearly the same feature): the same
    # ViT randomly initialised without LayerScale, i.e. random features.
    plain = load_config(repo_file(RECIPE), ["model.layerscale=0", f"train.seed={seed}"])  # this seed's draw
    random_features = knn_top1(teacher_backbone(plain, None, torch.device("cpu")))
    start = time.perf_counter()
    last = train(cfg, initial_state=initial)
    seconds = time.perf_counter() - start
    state, cfg, _ = read_checkpoint(run_dir)
    final = knn_top1(teacher_backbone(cfg, state, torch.device("cpu")))
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    curve = {0: init, **{r["step"]: r["knn_top1"] for r in records if "knn_top1" in r and r["step"] > 0}, steps: final}
    health = {k: last[k] for k in ("teacher_cls_entropy_frac", "teacher_cls_batch_entropy_frac",
                                   "student_cls_std", "teacher_cls_std") if k in last}
    return {"init": init, "random_features": random_features, "final": final, "curve": curve, "seconds": seconds,
            "collapse": last.get("collapse", []),
            "health": health, "loss": last.get("loss"), "knn_logged": last.get("knn_top1")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a few steps: a smoke test, never a result")
    p.add_argument("--only", choices=["ours", "lightly"], help="run one side only")
    p.add_argument("--knn-every", type=int, default=100, help="k-NN of both runs every N steps (a learning curve)")
    p.add_argument("--swap", action="append", choices=["data", "init"], default=[],
                   help="bisection: run lightly's loop with our data stream and masks / our ViT init (repeatable)")
    p.add_argument("--ours-init", choices=["own", "lightly"], default="own",
                   help="bisection: lightly = our engine starts from lightly's example's initial weights at each seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="bisection: a config override of our recipe (repeatable)")
    p.add_argument("--stop-after", type=int, help="bisection: end after N steps (the schedules still span --steps)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="seeds (init, data order, views, masks); several: both sides per seed, and the mean")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if (args.swap or args.stop_after) and (args.only != "lightly" or args.out is None):
        p.error("--swap / --stop-after are bisection runs: use them with --only lightly and an --out file")
    if (args.ours_init != "own" or args.overrides) and (args.only != "ours" or args.out is None):
        p.error("--ours-init / --set are bisection runs: use them with --only ours and an --out file")
    steps = 4 if args.quick else args.steps
    env = {**environment("cpu", command_line("python -m ibot_benchmarks.peer_learning", argv)), **peer_versions(),
           "seed": " ".join(map(str, args.seed))}
    sides = [side for side in ("ours", "lightly") if args.only in (None, side)]
    results: dict[str, dict[int, dict[str, Any]]] = {side: {} for side in sides}
    out = _out_path(args)
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(args.seed):  # seed by seed, both sides; the report is rewritten after each seed,
            if "ours" in sides:  # so a run cut short still leaves its finished, paired seeds
                results["ours"][seed] = run_ours(steps, workers=args.workers, run_dir=Path(tmp) / f"ours_{seed}",
                                                 knn_every=args.knn_every, seed=seed,
                                                 init_from_lightly=args.ours_init == "lightly",
                                                 overrides=tuple(args.overrides))
            if "lightly" in sides:
                results["lightly"][seed] = run_lightly(steps, workers=args.workers, knn_every=args.knn_every,
                                                       swap=frozenset(args.swap), stop_after=args.stop_after,
                                                       seed=seed)
            save_report(report(results, steps, args.seed[:i + 1], args, env), "peer_learning", "cpu", out,
                        args.quick)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(results: dict[str, dict[int, dict[str, Any]]], steps: int, seeds: list[int], args: argparse.Namespace,
           env: dict[str, str]) -> str:
    """The markdown report of the finished `seeds`: one row per side and seed, the per-seed gap, and with several
    seeds the means."""
    names = {"ours": f"ours (`{RECIPE}`)", "lightly": "lightly 1.6 iBOT example"}
    if args.ours_init == "lightly":
        names["ours"] += " from lightly's initial weights"
    if args.overrides:
        names["ours"] += f" with {' '.join(f'`{o}`' for o in args.overrides)}"
    if args.swap:
        names["lightly"] += f" with our {' and '.join(sorted(args.swap))}"
    if args.stop_after:
        names["lightly"] += f", stopped after {args.stop_after} steps of its {steps}-step schedules"
    rows = [[names[side], str(seed), f"{r['init']:.1f}%", f"{r['final']:.1f}%", f"{r['final'] - r['init']:+.1f}",
             f"{r['seconds'] / 60:.1f} min"] for side, runs in results.items() for seed, r in runs.items()]
    if len(seeds) > 1:
        for side, runs in results.items():
            finals = [r["final"] for r in runs.values()]
            rows.append([f"**{names[side]}, mean of {len(runs)} seeds**", "",
                         f"{_mean([r['init'] for r in runs.values()]):.1f}%",
                         f"**{_mean(finals):.1f}%** ({min(finals):.1f}-{max(finals):.1f})", "", ""])
    lines = [*header_lines(f"Learning on digits, {steps} steps: ours vs lightly's iBOT example", env), "",
             markdown_table(["run", "seed", "k-NN top-1 at init", f"after {steps} steps", "gain (points)",
                             "train time"], rows), ""]
    if len(results) == 2:
        ours, peer = results["ours"], results["lightly"]
        gaps = [ours[seed]["final"] - peer[seed]["final"] for seed in seeds]
        ratio = _mean([ours[seed]["seconds"] / peer[seed]["seconds"] for seed in seeds])
        lines.append(f"Ours minus lightly after {steps} steps: " + (
            f"{gaps[0]:+.1f} points of k-NN top-1" if len(seeds) == 1 else
            f"{_mean(gaps):+.1f} points of k-NN top-1 on the mean over seeds {', '.join(map(str, seeds))} (per seed: "
            f"{', '.join(f'{g:+.1f}' for g in gaps)})") +
            f" (train time ratio ours / lightly: {ratio:.2f}, same machine).")
    for seed, r in results.get("ours", {}).items():
        lines.append(f"Seed {seed}: random features (our ViT-tiny at random init without LayerScale, no training): "
                     f"{r['random_features']:.1f}%; ours after {steps} steps: "
                     f"{r['final'] - r['random_features']:+.1f} points over it. Our final training health: "
                     f"{json.dumps(r['health'])}; collapse warnings: {r['collapse'] or 'none'}.")
    for seed, r in results.get("lightly", {}).items():
        lines.append(f"Seed {seed}: lightly's final training health (same formulas): {json.dumps(r['health'])}.")
    return "\n".join([*lines, "", "```json", json.dumps(results, indent=1, default=float), "```", ""])


def _out_path(args: argparse.Namespace) -> Path | None:
    if args.out is not None or args.quick:
        return args.out
    # A full CPU run is the result this script exists for (unlike speed runs).
    seeds = "" if args.seed == [0] else "_seeds" + "-".join(map(str, args.seed))
    return results_dir() / f"peer_learning{seeds}_cpu{os.cpu_count()}core_{datetime.datetime.now(datetime.UTC):%Y%m}.md"


if __name__ == "__main__":
    main()
