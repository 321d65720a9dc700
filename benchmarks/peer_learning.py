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

* lightly: its iBOT example (lightly 1.6, `examples/pytorch/ibot.py`) changed only in size, as a user would run it on
  this data: timm ViT-tiny patch 8 at 64 px (LayerScale 1e-5, MAE init as the example's wrapper does), K = 1024,
  `IBOTTransform(global_crop_size=64, local_crop_size=32, n_local_views=4)` on a torchvision `ImageFolder`, batch 64,
  its own schedules over the run's steps (teacher temperature 0.04 -> 0.07 over 30/50 of them, weight decay
  0.04 -> 0.4, EMA 0.992 -> 1, AdamW at a constant 1e-3), its block masks.
* ours: `ibot train --config launch/configs/digits.yaml` (the 64 px small-data recipe) for the same steps, the same
  architecture, crop sizes, K and batch.

The report records the machine, versions, command, both k-NN figures at init and after training, the wall time
and the final training-health metrics of both runs.
"""

from __future__ import annotations

import argparse
import copy
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

from ibot_benchmarks.common import RESULTS_DIR, environment, markdown_table, report_header, save_report
from ibot_engine.checkpoint import read_checkpoint
from ibot_engine.config import load_config
from ibot_engine.data.digits import digits_folder
from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.stream import build_data_stream
from ibot_engine.eval.features import extract_features, teacher_backbone
from ibot_engine.eval.knn import weighted_knn
from ibot_engine.health import HEALTH_KEYS, health_metrics
from ibot_engine.model.ibot import IBOT
from ibot_engine.tools.export import backbone_state, from_timm, to_timm
from ibot_engine.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "launch" / "configs" / "digits.yaml"


# ----------------------------------------------------------------------------------------------------------------
# lightly's example, ported (its model pieces and loop body; also the whole-step parity test's peer)


class LightlyExample(torch.nn.Module):
    """The example's `IBOT` module, sized: timm ViT (LayerScale 1e-5, MAE init by lightly's wrapper, learned
    position embedding resampled for other crop sizes), student = a copy of the teacher with uniform drop path, a
    separately initialised teacher head with a frozen gain, the student head with a free one."""

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 out_dim: int = 1024, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 drop_path: float = 0.1) -> None:
        super().__init__()
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                num_heads=num_heads, pos_embed="learn", dynamic_img_size=True, init_values=1e-5,
                                num_classes=0)
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        if drop_path > 0:
            update_drop_path_rate(self.student_backbone.vit, drop_path_rate=drop_path, mode="uniform")
        self.student_head = DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, out_dim, norm_last_layer=False)
        self.teacher_head = DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, out_dim)
        for module in (self.teacher_backbone, self.teacher_head):
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> LightlyExample:
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        return self


def lightly_schedules(step: int, total_steps: int, warmup_steps: int) -> dict[str, float]:
    """The example's per-step values: teacher temperature, weight decay, EMA momentum."""
    from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule

    return {
        "teacher_temp": linear_warmup_schedule(step=step, warmup_steps=warmup_steps, start_value=0.04,
                                               end_value=0.07),
        "weight_decay": cosine_schedule(step=step, max_steps=total_steps, start_value=0.04, end_value=0.4),
        "momentum": cosine_schedule(step=step, max_steps=total_steps, start_value=0.992, end_value=1.0),
    }


def lightly_example_step(peer: LightlyExample, optimizer: torch.optim.Optimizer, dino: Any, ibot_patch: Any,
                         global_views: Tensor, local_views: Tensor, block_mask: Tensor, *, step: int,
                         total_steps: int, warmup_steps: int, grads: bool = False) -> dict[str, Any]:
    """One iteration of the example's loop body, in its order: teacher, student, `DINOLoss` + `IBOTPatchLoss`
    (each updates its centre after computing the loss), backward, weight decay schedule, AdamW step, EMA.

    global_views [2B, 3, H, W] and local_views [L*B, 3, h, w] view-major, block_mask [2B, H/p, W/p] bool. Returns the
    two losses and, with `grads`, a copy of the student gradients the optimizer applied (keyed "backbone.<name>" /
    "head.<name>")."""
    from lightly.models.utils import update_momentum

    s = lightly_schedules(step, total_steps, warmup_steps)
    num_views = (global_views.shape[0] + local_views.shape[0]) // (global_views.shape[0] // 2)
    mask = torch.cat([block_mask.new_zeros(block_mask.shape[0], 1), block_mask.flatten(1)], dim=1)  # + cls column
    with torch.no_grad():
        teacher_features = peer.teacher_backbone.encode(global_views)
        teacher_cls_out = peer.teacher_head(teacher_features[:, 0])
        teacher_masked_out = peer.teacher_head(teacher_features[mask])
    student_global = peer.student_backbone.encode(global_views, mask=mask)
    student_global_cls_out = peer.student_head(student_global[:, 0])
    student_global_masked_out = peer.student_head(student_global[mask])
    student_local_cls_out = peer.student_head(peer.student_backbone.encode(local_views)[:, 0])
    student_cls_out = torch.cat([student_global_cls_out, student_local_cls_out])
    center = dino.center.detach().clone()  # the centre this step's targets use (DINOLoss updates it in the call)
    dino_loss = dino(teacher_out=teacher_cls_out.chunk(2), student_out=student_cls_out.chunk(num_views),
                     teacher_temp=s["teacher_temp"])
    ibot_loss = ibot_patch(teacher_out=teacher_masked_out, student_out=student_global_masked_out, mask=block_mask,
                           teacher_temp=s["teacher_temp"])
    (dino_loss + ibot_loss).backward()
    peer.student_head.cancel_last_layer_gradients(0)  # the example's call; freeze_last_layer=-1: a no-op
    for group in optimizer.param_groups:
        if group["weight_decay"] != 0.0:
            group["weight_decay"] = s["weight_decay"]
    with torch.no_grad():  # the same training-health numbers as ours (engine/health.py)
        health = health_metrics(teacher_cls_out, teacher_cls_out[:0], center.flatten(), center.flatten(),
                                s["teacher_temp"], s["teacher_temp"], student_global[:, 0], teacher_features[:, 0])
    out: dict[str, Any] = {"loss_cls": dino_loss.detach(), "loss_patch": ibot_loss.detach(),
                           "health": dict(zip(HEALTH_KEYS, health.tolist(), strict=True))}
    if grads:
        out["grads"] = {**{f"backbone.{k}": p.grad.clone() for k, p in peer.student_backbone.named_parameters()},
                        **{f"head.{k}": p.grad.clone() for k, p in peer.student_head.named_parameters()}}
    optimizer.step()
    optimizer.zero_grad()
    update_momentum(peer.student_backbone, peer.teacher_backbone, m=s["momentum"])
    update_momentum(peer.student_head, peer.teacher_head, m=s["momentum"])
    return out


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
    """lightly's example model as `run_lightly` draws it at `seed` (its initial weights)."""
    torch.manual_seed(seed)
    random.seed(seed)  # lightly's block masks draw from Python's random
    return LightlyExample(img_size=64, patch_size=8)


def ours_state_from_lightly(peer: LightlyExample, ours: IBOT) -> dict[str, Tensor]:
    """The peer's weights as our `IBOT` state dict (timm's ViT keys through `from_timm`; the head's `layers.*` is our
    `mlp.*`), with `ours`' centres. The shapes must agree (same sizes on both sides)."""
    state = {}
    for mine, vit in (("student", peer.student_backbone.vit), ("teacher", peer.teacher_backbone.vit)):
        state.update({f"{mine}.backbone.{k}": v.clone() for k, v in from_timm(vit.state_dict()).items()})
    state["student.backbone.mask_token"] = peer.student_backbone.mask_token.detach().reshape(1, -1).clone()
    for mine, head in (("student", peer.student_head), ("teacher", peer.teacher_head)):
        for key, value in head.state_dict().items():
            state[f"{mine}.head.{key.replace('layers.', 'mlp.')}"] = value.clone()
    state["cls_center"] = ours.cls_center.clone()
    state["patch_center"] = ours.patch_center.clone()
    return state


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
    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models.utils import random_block_mask
    from lightly.transforms.ibot_transform import IBOTTransform

    peer = lightly_draw(seed)
    recipe = load_config(RECIPE, [f"data.num_workers={workers}"])
    if "init" in swap:
        _load_our_backbones(peer, recipe)
    init = knn_top1(_Encode(peer.teacher_backbone))
    if "data" in swap:
        stream = build_data_stream(recipe.data, recipe.mask, batch_size=64, patch_size=8, seed=seed,
                                   device=torch.device("cpu"))
    else:
        dataset = torchvision.datasets.ImageFolder(str(digits_folder("train")),
                                                   transform=IBOTTransform(global_crop_size=64, local_crop_size=32,
                                                                           n_local_views=4))
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True,
                                             num_workers=workers)

    def epoch() -> Any:
        """One pass of (global views [2B], local views [4B], block masks [2B, 8, 8])."""
        if "data" in swap:
            return ((b.global_crops, b.local_crops, b.masks) for b in stream)
        return ((torch.cat(views[:2]), torch.cat(views[2:]), random_block_mask(size=(2 * 64, 8, 8)))
                for views, _ in loader)

    dino, ibot_patch = DINOLoss(output_dim=1024, teacher_temp=0.07), IBOTPatchLoss(output_dim=1024, teacher_temp=0.07)
    optimizer = torch.optim.AdamW(peer.parameters(), lr=0.001)  # the example's: every parameter, weight decay too
    warmup = int(30 / 50 * steps)  # the example: 30 of its 50 epochs
    last = min(steps, stop_after or steps)
    peer.train()
    start, step, losses, curve = time.perf_counter(), 0, [], {0: init}
    while step < last:
        for global_views, local_views, block_mask in epoch():
            out = lightly_example_step(peer, optimizer, dino, ibot_patch, global_views, local_views, block_mask,
                                       step=step, total_steps=steps, warmup_steps=warmup)
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
    cfg = load_config(RECIPE, [f"train.steps={steps}", f"run.dir={run_dir}", f"data.num_workers={workers}",
                               "checkpoint.every=0", "checkpoint.resume=none", f"eval.knn_every={knn_every}",
                               f"train.seed={seed}", *overrides])
    initial = ours_state_from_lightly(lightly_draw(seed), IBOT(cfg.model, cfg.loss)) if init_from_lightly else None
    init = knn_top1(teacher_backbone(cfg, initial, torch.device("cpu")))
    # A stronger baseline than the init (whose LayerScale 1e-5 gives every image nearly the same feature): the same
    # ViT randomly initialised without LayerScale, i.e. random features.
    plain = load_config(RECIPE, ["model.layerscale=0", f"train.seed={seed}"])  # this seed's draw
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
    env = environment("cpu", "ibot_benchmarks.peer_learning")
    import lightly
    import timm

    env.update({"lightly": lightly.__version__, "timm": timm.__version__, "threads": str(torch.get_num_threads()),
                "seed": " ".join(map(str, args.seed))})
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
    names = {"ours": f"ours (`{RECIPE.relative_to(ROOT)}`)", "lightly": "lightly 1.6 iBOT example"}
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
    lines = [*report_header(f"Learning on digits, {steps} steps: ours vs lightly's iBOT example", env), "",
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
    return RESULTS_DIR / f"peer_learning{seeds}_cpu{os.cpu_count()}core_{datetime.datetime.now(datetime.UTC):%Y%m}.md"


if __name__ == "__main__":
    main()
