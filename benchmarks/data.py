"""Data pipeline throughput: img/s of the whole shard pipeline vs dataloader workers, CPU path and GPU path.

Measured per configuration: read the shards, decode, 2 x 224 + 10 x 96 multi-crop with the full iBOT augmentation,
masks from the collate, and the host-to-device copy (`Batch.to(device)`); on CUDA the clock stops after a device
synchronisation, so queued GPU work is counted. Batches come from the endless (resampled) stream; the first
`--warmup` batches (worker start-up) are not timed.

* CPU path (`data.augment=cpu`): PIL + torchvision.transforms.v2 in the workers.
* GPU path (`data.augment=gpu`): workers read and check the JPEGs and draw the view parameters; the training
  process decodes the batch (`decode_jpeg` on a list: nvJPEG on CUDA) and crops / augments it with batched torch
  ops, on a side stream. Without a GPU the same torch ops run on the CPU: such rows are labelled "ops on cpu" and
  say nothing about GPU speed.

The last column estimates the fraction of a ViT-S/16 step that would wait for data if the step ran at the
project's 1,850 img/s goal for one H100: max(0, 1 - pipeline img/s / 1,850) (no overlap assumed beyond the
loader's prefetch). Data: realistic JPEG shards (benchmarks/make_shards.py, ~500 x 375, quality 90), made on first
use under --cache unless --shards is given.

    python -m benchmarks.data                          # defaults: workers 0,1,2,4,8,16 (up to the CPU count)
    python -m benchmarks.data --workers 0,2 --batches 5 --batch-size 32     # a short run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, device_name, device_slug, git_sha, markdown_table
from engine.config import DataConfig, MaskConfig
from engine.data.shards.resolve import MANIFEST
from engine.data.stream import build_data_stream

VIT_S16_TARGET = 1850.0  # img/s of one H100 for a ViT-S/16 step (the project's goal)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(shards: str, path: str, workers: int, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = DataConfig(
        shards=shards, shard_mode="resampled", epoch_samples=10**9, shuffle_buffer=args.shuffle_buffer,
        global_size=args.global_size, local_size=args.local_size, num_local=args.num_local, num_workers=workers,
        augment=path, decode=args.decode,
    )
    stream = build_data_stream(cfg, MaskConfig(), batch_size=args.batch_size, patch_size=args.patch_size, seed=0,
                               device=device)
    batches = iter(stream)

    def one() -> None:
        batch = next(batches).to(device)
        assert batch.global_crops.shape[0] == cfg.num_global * args.batch_size

    for _ in range(args.warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.batches):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    stream.close()  # stop the workers before the next configuration starts its own
    rate = args.batches * args.batch_size / seconds
    return {"path": path, "workers": workers, "img_per_s": rate, "ms_per_batch": 1e3 * seconds / args.batches,
            "stall": max(0.0, 1.0 - rate / VIT_S16_TARGET)}


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
    parser.add_argument("--cache", default=str(Path(__file__).resolve().parent / ".cache" / "data_shards"))
    parser.add_argument("--images", type=int, default=2000, help="images to make when the cache is empty")
    parser.add_argument("--paths", default="cpu,gpu", help="comma list of cpu, gpu")
    parser.add_argument("--workers", default="", help="comma list (default 0,1,2,4,8,16 up to the CPU count)")
    parser.add_argument("--decode", default="gpu", choices=["gpu", "cpu"], help="GPU path: where JPEGs are decoded")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--num-local", type=int, default=10)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", help="report path (default benchmarks/results/data_<card>_<yyyymm>.md)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          (args.device if args.device != "auto" else "cpu"))
    shards = args.shards
    if shards is None:
        shards = args.cache
        if not (Path(shards) / MANIFEST).is_file():
            from benchmarks.make_shards import make_shards

            make_shards(shards, images=args.images)
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [
        w for w in (0, 1, 2, 4, 8, 16) if w <= cores]
    rows = []
    load_before = os.getloadavg()[0]
    for path in args.paths.split(","):
        for w in workers:
            result = measure(shards, path, w, args, device)
            where = device.type if path == "gpu" else "cpu workers"
            label = f"gpu (decode {args.decode}, ops on {where})" if path == "gpu" else "cpu (PIL + transforms.v2)"
            rows.append([label, w, f"{result['img_per_s']:.1f}", f"{result['ms_per_batch']:.0f}",
                         f"{100 * result['stall']:.0f}%"])
            print(f"{label:40s} workers {w:2d}: {result['img_per_s']:8.1f} img/s", flush=True)

    slug = device_slug(device.type) if device.type == "cuda" else f"cpu{cores}core"
    now = datetime.datetime.now(datetime.UTC)
    out = Path(args.out) if args.out else RESULTS_DIR / f"data_{slug}_{now:%Y%m}.md"
    import PIL
    import torchvision
    import webdataset

    env = [
        ("date", now.strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{cpu_model()}, {cores} CPUs visible" + (f", {device_name('cuda')}" if device.type == "cuda"
                                                              else ", no GPU")),
        ("versions", f"torch {torch.__version__}, torchvision {torchvision.__version__}, webdataset "
                     f"{webdataset.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}"),
        ("load average (1 min)", f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after the runs "
                                 "(other processes on the machine share its CPUs)"),
        ("git", git_sha()),
        ("command", " ".join(["python -m benchmarks.data", *(argv if argv is not None else sys.argv[1:])])),
        ("data", data_description(shards)),
        ("per image", f"{2} x {args.global_size} + {args.num_local} x {args.local_size} crops, full iBOT "
                      f"augmentation, official masks (patch {args.patch_size}), batch {args.batch_size}, "
                      f"{args.batches} timed batches after {args.warmup} warm-up"),
    ]
    notes = []
    if device.type != "cuda":
        notes.append("No GPU on this machine: the GPU-path rows ran their torch ops on the CPU (in the training "
                     "process) and do not measure GPU speed. GPU numbers are unmeasured here; on a CUDA machine run "
                     "`python -m benchmarks.data` (one command) to measure them.")
    text = "\n".join([
        "# Data pipeline throughput", "",
        *[f"- {k}: {v}" for k, v in env], "",
        markdown_table(["path", "workers", "img/s", "ms / batch", "ViT-S/16 stall at 1,850 img/s (est.)"], rows), "",
        *notes, "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
