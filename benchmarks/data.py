"""Data pipeline throughput: img/s of the whole pipeline vs dataloader workers, for the official transforms, our CPU
path and the GPU path, on JPEG shards and on an image folder of the same files; and the data wait of the training
step (`ibot bench --data`) with the official transforms and with ours.

Measured per configuration: read the shards (or the folder's files), decode, 2 x 224 + 10 x 96 multi-crop with the
full iBOT augmentation, masks from the collate, and the host-to-device copy (`Batch.to(device)`); on CUDA the clock
stops after a device synchronisation, so queued GPU work is counted. Batches come from the endless stream (shards:
resampled); the first `--warmup` batches (worker start-up) are not timed.

* official (`--paths official`): the official iBOT transforms (engine/bench/official_aug.py: torchvision.transforms
  v1 on PIL, PIL decode, ToTensor + Normalize per view), passed to our stream as its augmenter, so everything
  else (reading, collate, masks) is the same code as ours.
* cpu (`data.augment=cpu`): engine/data/cpu_aug.py, uint8 views normalised by the collate.
* gpu (`data.augment=gpu`): workers read and check the JPEGs and draw the view parameters; the training process
  decodes the batch (`decode_jpeg` on a list: nvJPEG on CUDA) and crops / augments it with batched torch ops, on a
  side stream. Without a GPU the same torch ops run on the CPU: such rows are labelled "ops on cpu" and say nothing
  about GPU speed.

img/s per core = img/s / max(1, workers). With workers >= 1 the workers do all the data work and the training
process only receives batches, so a core is a worker; with 0 workers the training process does all of it in one
thread (this script sets torch, and the augmenters set OpenCV, to one thread), so it counts as one core. The
"cores for 1,850 img/s" column divides the project's goal for one H100 (a ViT-S/16 step) by img/s per core. On a
shared machine other processes take turns on the same cores, so each row also gives images per CPU-second: images
over the CPU time (user + system, from /proc) that the training process and its workers used in the timed window,
which the neighbours' load leaves alone (mostly: they still share caches and memory bandwidth).

The data wait (`--train-workers`, on shards): the harness of `ibot bench --data` (the real trainer and training step)
on `--train-config` (default: the ViT-S/16 recipe made ViT-tiny, fp32, so that a CPU step takes seconds, not a
minute), its stream given the path's augmenter, times `next(batch)` + `.to(device)` apart from the step; "data
wait" is its share of the wall time. With 0 workers the data work
runs between steps in the training process; with workers it overlaps the step, but on a small machine the workers
and the step share the cores.

Data: realistic JPEG shards (benchmarks/make_shards.py, ~500 x 375, quality 90), made on first use under --cache
unless --shards is given; the image folder is the shards' JPEGs extracted next to them (`<shards>_folder`) unless
--folder is given.

    python -m ibot_benchmarks.data                          # defaults: workers 0,1,2,4,8,16 (up to the CPU count)
    python -m ibot_benchmarks.data --workers 0,1,2 --paths official,cpu --batches 8      # the CPU comparison
    python -m ibot_benchmarks.data --sources shards --paths cpu,gpu --train-workers ""   # a short GPU-path run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from ibot_benchmarks.common import repo_file
from ibot_engine.bench.harness import StepHarness, bench_harness
from ibot_engine.bench.official_aug import OfficialAugmenter
from ibot_engine.bench.report import (
    command_line,
    device_name,
    device_slug,
    environment,
    header_lines,
    markdown_table,
    results_dir,
)
from ibot_engine.config import DataConfig, MaskConfig, load_config
from ibot_engine.data import cpu_aug
from ibot_engine.data.batch import MultiCropCollate
from ibot_engine.data.folder import IMAGE_EXTENSIONS
from ibot_engine.data.shards.resolve import MANIFEST
from ibot_engine.data.stream import build_data_stream
from ibot_engine.distributed import init_distributed, teardown
from ibot_engine.precision import autocast_dtype
from ibot_engine.train.trainer import build_trainer

VIT_S16_TARGET = 1850.0  # img/s of one H100 for a ViT-S/16 step (the project's goal)
TRAIN_CONFIG = "launch/configs/vit_s16.yaml"  # the data-wait runs' config (`repo_file`)
TRAIN_OVERRIDES = ("model.arch=vit_tiny", "model.out_dim=1024", "precision=fp32", "train.batch_size=16")
LABELS = {"official": "official (PIL + transforms v1)", "cpu": "ours (data.augment=cpu)"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def augmenter_for(path: str, data_cfg: DataConfig, mask_cfg: MaskConfig, *, patch_size: int, seed: int,
                  rank: int = 0) -> OfficialAugmenter | None:
    """The augmenter a stream gets for `path`: the official transforms for "official", with the masking collate the
    stream's own augmenter would have (same patch grid, seed and rank, so the same masks); None (the one
    `data.augment` names) otherwise."""
    if path != "official":
        return None
    grid = (data_cfg.global_size // patch_size, data_cfg.global_size // patch_size)
    collate = MultiCropCollate(mask_cfg, num_global=data_cfg.num_global, local_size=data_cfg.local_size, grid=grid,
                               seed=seed, rank=rank)
    return OfficialAugmenter(data_cfg, collate)


def cpu_seconds(stream: object) -> float:
    """CPU seconds used so far by this process and the stream's dataloader workers (Linux /proc; NaN elsewhere):
    on a shared machine, what the pipeline itself consumed, whatever else runs on the cores."""
    total = time.process_time()
    for worker in getattr(getattr(stream, "_batches", None), "_workers", []):  # the DataLoader iterator's processes
        try:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def source_fields(source: str, data: str, args: argparse.Namespace) -> dict:
    if source == "shards":
        return {"shards": data, "shard_mode": "resampled", "epoch_samples": 10**9,
                "shuffle_buffer": args.shuffle_buffer}
    return {"path": data}


def measure(source: str, data: str, path: str, workers: int, args: argparse.Namespace,
            device: torch.device) -> dict:
    cfg = DataConfig(
        **source_fields(source, data, args), global_size=args.global_size, local_size=args.local_size,
        num_local=args.num_local, num_workers=workers, augment="gpu" if path == "gpu" else "cpu", decode=args.decode,
    )
    mask_cfg = MaskConfig()
    augmenter = augmenter_for(path, cfg, mask_cfg, patch_size=args.patch_size, seed=0)
    stream = build_data_stream(cfg, mask_cfg, batch_size=args.batch_size, patch_size=args.patch_size, seed=0,
                               device=device, augmenter=augmenter)
    batches = iter(stream)

    def one() -> None:
        batch = next(batches).to(device)
        assert batch.global_crops.shape[0] == cfg.num_global * args.batch_size
        assert batch.global_crops.dtype == torch.float32

    for _ in range(args.warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), cpu_seconds(stream)
    for _ in range(args.batches):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - start, cpu_seconds(stream) - cpu_start
    stream.close()  # stop the workers before the next configuration starts its own
    images = args.batches * args.batch_size
    rate = images / seconds
    return {"source": source, "path": path, "workers": workers, "img_per_s": rate,
            "per_core": rate / max(1, workers), "ms_per_batch": 1e3 * seconds / args.batches,
            "per_cpu_s": images / cpu if cpu > 0 else float("nan")}


def train_data_wait(shards: str, path: str, workers: int, args: argparse.Namespace) -> dict:
    """The training step's data wait on the shards with `path`'s transforms, timed by the harness of
    `ibot bench --data` (the real trainer and step; one process): step ms, img/s and the data-wait share."""
    with tempfile.TemporaryDirectory(prefix="ibot-data-wait-") as tmp:
        overrides = [*args.train_overrides.split(), f"data.shards={shards}", f"data.num_workers={workers}",
                     f"data.global_size={args.global_size}", f"data.local_size={args.local_size}",
                     f"data.num_local={args.num_local}", f"model.img_size={args.global_size}",
                     f"model.patch_size={args.patch_size}", f"run.dir={tmp}/run"]
        preset = args.train_config if Path(args.train_config).is_file() else repo_file(args.train_config)
        cfg = load_config(preset, overrides)
        env = init_distributed()
        try:
            augmenter = augmenter_for(path, cfg.data, cfg.mask, patch_size=cfg.model.patch_size, seed=cfg.train.seed,
                                      rank=env.rank)
            trainer = build_trainer(cfg, env, augmenter=augmenter)
            harness = StepHarness(cfg, env, trainer, autocast_dtype(cfg.precision, env.device), batches=None)
            row = bench_harness(harness, steps=args.train_steps, warmup=1, peak=None)
            trainer.data.close()
        finally:
            teardown()
    return {"path": path, "workers": workers, "step_ms": row.step_ms_median, "img_per_s": row.img_per_s,
            "data_wait": row.data_wait_share}


def folder_of(shards: str) -> str:
    """The shards' images extracted into `<shards>_folder` (made once), for the image-folder rows."""
    folder = Path(f"{str(shards).rstrip('/')}_folder")
    if folder.is_dir() and any(folder.iterdir()):
        return str(folder)
    manifest = json.loads((Path(shards) / MANIFEST).read_text())
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    for entry in manifest["shards"]:
        with tarfile.open(Path(shards) / entry["name"]) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                    name = Path(member.name).name
                    (staging / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    staging.rename(folder)  # whole or absent: a run stopped halfway leaves only its staging folder
    return str(folder)


def data_description(shards: str) -> str:
    manifest_path = Path(shards) / MANIFEST
    if not manifest_path.is_file():
        return f"shards {shards}"
    manifest = json.loads(manifest_path.read_text())
    size = sum((Path(shards) / s["name"]).stat().st_size for s in manifest["shards"])
    return (f"{manifest['total']} JPEGs in {len(manifest['shards'])} shards ({shards}), "
            f"{size / max(manifest['total'], 1) / 1024:.0f} KiB per image on average")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard folder / pattern (default: realistic shards made under --cache)")
    parser.add_argument("--folder", help="image folder of the same images (default: the shards' JPEGs extracted "
                                         "to <shards>_folder)")
    parser.add_argument("--cache", default=str(Path("benchmarks") / ".cache" / "data_shards"))
    parser.add_argument("--images", type=int, default=2000, help="images to make when the cache is empty")
    parser.add_argument("--sources", default="shards,folder", help="comma list of shards, folder")
    parser.add_argument("--paths", default="official,cpu,gpu", help="comma list of official, cpu, gpu")
    parser.add_argument("--workers", default="", help="comma list (default 0,1,2,4,8,16 up to the CPU count)")
    parser.add_argument("--decode", default="gpu", choices=["gpu", "cpu"], help="GPU path: where JPEGs are decoded")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="measurements per row (interleaved); the best is kept")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--num-local", type=int, default=10)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--train-workers", default="0,1", help="data-wait runs: comma list of data.num_workers "
                                                               "(empty: none)")
    parser.add_argument("--train-config", default=TRAIN_CONFIG, help="data-wait runs: the config")
    parser.add_argument("--train-overrides", default=" ".join(TRAIN_OVERRIDES), help="data-wait runs: overrides")
    parser.add_argument("--train-steps", type=int, default=3, help="data-wait runs: timed steps (after 1 warm-up)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", help="report path (default benchmarks/results/data_<card>_<yyyymm>.md)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          (args.device if args.device != "auto" else "cpu"))
    train_threads = torch.get_num_threads()  # the training step of the data-wait runs keeps its usual threads
    torch.set_num_threads(1)  # workers = 0: the training process is one core (see the module docstring)
    shards = args.shards
    if shards is None:
        shards = args.cache
        if not (Path(shards) / MANIFEST).is_file():
            from ibot_benchmarks.make_shards import make_shards

            make_shards(shards, images=args.images)
    sources = [s for s in args.sources.split(",") if s]
    data = {"shards": shards, "folder": args.folder or (folder_of(shards) if "folder" in sources else "")}
    paths = [p for p in args.paths.split(",") if p]
    notes = []
    if "cpu" in paths and cpu_aug.cv2 is None:  # e.g. the GPU device's image (prepare_gpu_carry.sh)
        paths.remove("cpu")
        notes.append("OpenCV is not installed here: no rows for data.augment=cpu (pip install "
                     "opencv-python-headless).")
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [
        w for w in (0, 1, 2, 4, 8, 16) if w <= cores]
    train_workers = [int(w) for w in args.train_workers.split(",") if w.strip()]
    waits = []
    load_before = os.getloadavg()[0]
    # The paths of one worker count run back to back (and --repeats times over), so that a change in the load of a
    # shared machine hits the official and our rows alike; each row keeps its best repeat.
    best: dict[tuple[str, str, int], dict] = {}
    for source in sources:
        for w in workers:
            for _ in range(args.repeats):
                for path in paths:
                    r = measure(source, data[source], path, w, args, device)
                    print(f"{source:7s} {path:9s} workers {w:2d}: {r['img_per_s']:8.1f} img/s, "
                          f"{r['per_core']:7.1f} per core, {r['per_cpu_s']:7.1f} per CPU-s", flush=True)
                    key = (source, path, w)
                    if key not in best or r["img_per_s"] > best[key]["img_per_s"]:
                        best[key] = r
    results = [best[(source, path, w)] for source in sources for path in paths for w in workers]
    for path in [p for p in paths if p != "gpu"]:
        for w in train_workers:
            torch.set_num_threads(train_threads)
            waits.append(train_data_wait(shards, path, w, args))
            torch.set_num_threads(1)
            print(f"train   {path:9s} workers {w:2d}: data wait {100 * waits[-1]['data_wait']:.1f}%", flush=True)
    load_after = os.getloadavg()[0]

    def label(path: str) -> str:
        if path != "gpu":
            return LABELS[path]
        return f"gpu (decode {args.decode}, ops on {device.type if device.type == 'cuda' else 'cpu'})"

    rows = [[r["source"], label(r["path"]), r["workers"], f"{r['img_per_s']:.1f}", f"{r['per_core']:.1f}",
             f"{r['per_cpu_s']:.1f}", f"{r['ms_per_batch']:.0f}", f"{VIT_S16_TARGET / r['per_core']:.0f}"]
            for r in results]
    by_key = {(r["source"], r["path"], r["workers"]): r for r in results}
    ratio_rows = []
    for source in sources:
        for w in workers:
            if (source, "official", w) in by_key and (source, "cpu", w) in by_key:
                theirs, ours = by_key[(source, "official", w)], by_key[(source, "cpu", w)]
                ratio_rows.append([source, w, f"{theirs['per_core']:.1f}", f"{ours['per_core']:.1f}",
                                   f"{ours['per_core'] / theirs['per_core']:.2f}x", f"{theirs['per_cpu_s']:.1f}",
                                   f"{ours['per_cpu_s']:.1f}", f"{ours['per_cpu_s'] / theirs['per_cpu_s']:.2f}x"])
    wait_rows = [[label(r["path"]), r["workers"], f"{r['step_ms']:.0f}", f"{r['img_per_s']:.2f}",
                  f"{100 * r['data_wait']:.1f}%"] for r in waits]

    slug = device_slug(device.type) if device.type == "cuda" else f"cpu{cores}core"
    now = datetime.datetime.now(datetime.UTC)
    out = Path(args.out) if args.out else results_dir() / f"data_{slug}_{now:%Y%m}.md"
    import cv2
    import PIL
    import torchvision
    import webdataset

    env = environment(device, command_line("python -m ibot_benchmarks.data", argv))
    env.update({
        "machine": f"{cpu_model()}, {cores} CPUs visible" + (f", {device_name('cuda')}" if device.type == "cuda"
                                                             else ", no GPU"),
        "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, OpenCV {cv2.__version__}, "
                    f"Pillow {PIL.__version__}, webdataset {webdataset.__version__}, Python "
                    f"{platform.python_version()}",
        "load average (1 min)": f"{load_before:.2f} before, {load_after:.2f} after the runs "
                                "(other processes on the machine share its CPUs)",
        "data": data_description(shards) + (f"; image folder {data['folder']}: the same JPEGs"
                                            if "folder" in sources else ""),
        "per image": f"2 x {args.global_size} + {args.num_local} x {args.local_size} crops, full iBOT "
                     f"augmentation, official masks (patch {args.patch_size}), batch {args.batch_size}, "
                     f"{args.batches} timed batches after {args.warmup} warm-up, best of {args.repeats} "
                     "interleaved repeats per row",
        "per core": "img/s / max(1, workers): a worker per core; with 0 workers the training process does all "
                    "the data work in one thread (torch and OpenCV set to 1 thread)",
        "per CPU-second": "images / CPU seconds (user + system) of the training process and its dataloader "
                          "workers over the timed batches: the cost per core, whatever else the shared cores run",
    })
    sections = [*header_lines("Data pipeline throughput", env), "",
                markdown_table(["source", "path", "workers", "img/s", "img/s per core", "img per CPU-s", "ms / batch",
                                "cores for 1,850 img/s"], rows), ""]
    if ratio_rows:
        sections += ["## Ours vs the official transforms, per core (same images, same workers, same run)", "",
                     markdown_table(["source", "workers", "official img/s per core", "ours img/s per core",
                                     "ratio", "official img per CPU-s", "ours img per CPU-s", "ratio (CPU time)"],
                                    ratio_rows), ""]
    if wait_rows:
        sections += ["## Data wait of the training step (`ibot bench --data`, shards)", "",
                     f"- config: {args.train_config} {args.train_overrides}, {args.train_steps} timed steps after "
                     "1 warm-up; data wait = the share of wall time spent in `next(batch)` + `.to(device)`", "",
                     markdown_table(["path", "data.num_workers", "step ms (median)", "img/s", "data wait"],
                                    wait_rows), ""]
    sections += [*notes, ""] if notes else []
    if device.type != "cuda" and "gpu" in paths:
        sections += ["No GPU on this machine: the GPU-path rows ran their torch ops on the CPU (in the training "
                     "process) and do not measure GPU speed. GPU numbers are unmeasured here; on a CUDA machine run "
                     "`python -m ibot_benchmarks.data` (one command) to measure them.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(sections))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
