"""`ibot` command line (also `python -m ibot_engine`, which torchrun uses).

    ibot train --config launch/configs/vit_s16.yaml optim.lr=1e-3 data.path=/data/in1k/train
    ibot demo                      # ViT-tiny on the built-in dataset: k-NN before/after, throughput, loss curve
    ibot eval knn --checkpoint RUN_OR_FILE
    ibot eval linear --checkpoint RUN_OR_FILE
    ibot export --checkpoint RUN_OR_FILE --format timm
    ibot visualize --checkpoint RUN_OR_FILE --image FILE
    ibot plot RUN_DIR              # loss, k-NN and training-health curve PNGs from metrics.jsonl
    ibot shards write SRC OUT      # WebDataset shards + manifest.json (train with data.shards=OUT)
    ibot bench --config launch/configs/vit_s16.yaml --compare lightly   # img/s, MFU, peak memory -> benchmarks/results
    ibot profile --config launch/configs/vit_s16.yaml --out runs/profile  # torch.profiler traces + kernel table
"""

from __future__ import annotations

import argparse
import sys

from ibot_engine.config import ConfigError, load_config
from ibot_engine.configs import DEMO_CONFIG
from ibot_engine.preempt import REQUEUE_EXIT_CODE, Preempted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibot", description="iBOT self-supervised pretraining of ViTs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (resumes from the run directory's latest checkpoint by default)")
    _add_config_args(p, "optim.lr=1e-3")

    p = sub.add_parser("demo", help="pretrain a ViT-tiny on the built-in dataset; k-NN before and after")
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    ev = p.add_subparsers(dest="eval_command", required=True)
    k = ev.add_parser("knn", help="weighted k-NN on teacher cls features (DINO protocol)")
    _add_eval_args(k)
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    lin = ev.add_parser("linear", help="linear probe on frozen teacher features (lr sweep on cached features)")
    _add_eval_args(lin)
    lin.add_argument("--epochs", type=int, default=10)
    lin.add_argument("--lrs", type=float, nargs="+", help="learning-rate sweep (default 1e-3 ... 1.0)")

    p = sub.add_parser("shards", help="WebDataset shards")
    sh = p.add_subparsers(dest="shards_command", required=True)
    w = sh.add_parser("write", help="image folder, flat folder or file list -> tar shards + manifest.json")
    w.add_argument("src", help="image folder (class sub-folders keep labels), flat folder, or file list")
    w.add_argument("out", help="output folder for the shards and manifest.json")
    w.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    w.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most")
    w.add_argument("--max-side", type=int, default=0, help="re-encode images whose longer side exceeds this")
    w.add_argument("--workers", type=int, default=0, help="writer processes (default: one per CPU, at most 16)")
    w.add_argument("--prefix", default="shard", help="shard file name prefix")

    p = sub.add_parser("export", help="write a backbone in a released layout (ours, timm, DINOv2, DINOv3, HF)")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--format", choices=EXPORT_FORMATS, default="timm",
                   help="ibot-engine: safetensors, our keys (safetensors: its old name, same file); timm (the "
                        "default): safetensors for timm.create_model (name and kwargs in the metadata); dinov2 / "
                        "dinov3: the official hub .pth layouts; hf: a transformers folder")
    _add_init_format(p)
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--out", help="output file (folder for hf) (default: next to the checkpoint)")

    p = sub.add_parser("visualize", help="PNG of the last block's cls attention per head and of block masks")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    _add_init_format(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--size", type=int,
                   help="input side in pixels (default data.global_size; a released file's native size)")
    p.add_argument("--tile", type=int, default=224, help="side of each tile of the figure in pixels")
    p.add_argument("--out", help="PNG path (default: next to the checkpoint)")

    p = sub.add_parser("plot", help="draw the loss, k-NN and training-health curves of a run to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")

    p = sub.add_parser("bench", help="time the real training step: img/s, step ms, MFU, peak memory, data wait")
    _add_config_args(p, "train.batch_size=128")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--data", action="store_true", help="batches from data.path / data.shards instead of synthetic")
    p.add_argument("--num-batches", type=int, default=4, help="synthetic batches made once and cycled")
    p.add_argument("--compare", choices=["lightly"], help="also time lightly's iBOT step (the bench extra)")
    p.add_argument("--find-max-batch", action="store_true", help="also search the largest batch that fits")
    p.add_argument("--max-batch", type=int, help="cap of the --find-max-batch search (needed on CPU)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: table of known cards)")
    p.add_argument("--out", help="markdown report (default benchmarks/results/bench_<arch>_b<B>_<card>_<date>.md)")

    p = sub.add_parser("profile", help="torch.profiler over real training steps: traces, kernel-category table")
    _add_config_args(p, "model.pack_crops=true")
    p.add_argument("--wait", type=int, default=1, help="steps skipped before the profiler warms up")
    p.add_argument("--warmup", type=int, default=1, help="steps profiled but discarded")
    p.add_argument("--active", type=int, default=3, help="steps recorded")
    p.add_argument("--data", action="store_true", help="batches from data.path / data.shards instead of synthetic")
    p.add_argument("--out", help="output folder (default runs/profile_<arch><patch>)")
    return parser


def _add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    """--config PRESET and the dotted overrides, for the commands that build a run from a config."""
    p.add_argument("--config", help="YAML preset, e.g. launch/configs/vit_s16.yaml")
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")


# The formats `ibot export` writes and `--init-format` reads (ibot_engine.model.released WRITE_FORMATS / FORMATS, and
# export's alias), spelled out here: `ibot --help` imports no torch.
EXPORT_FORMATS = ["ibot-engine", "timm", "dinov2", "dinov3", "hf", "safetensors"]
INIT_FORMATS = ["auto", "ibot", "dino", "dinov2", "dinov3", "timm", "hf", "ibot-engine"]
CHECKPOINT_HELP = ("our checkpoint (run directory, checkpoint directory or .pt file), else released weights: an "
                   "iBOT / DINO / DINOv2 / DINOv3 / timm file, a Hugging Face folder or an `ibot export` file")


def _add_init_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-format", choices=INIT_FORMATS, default="auto",
                   help="layout of released weights given as --checkpoint (auto: from the keys and metadata; "
                        "our checkpoints are then looked for first)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """Inputs and outputs shared by `eval knn` and `eval linear`."""
    p.add_argument("--checkpoint", help=f"{CHECKPOINT_HELP} (omit with --random-init)")
    _add_init_format(p)
    p.add_argument("--img-size", type=int,
                   help="side the images are resized to (default: data.global_size of the run; a released file's "
                        "native size, e.g. 518 for DINOv2's hub files)")
    p.add_argument("--random-init", action="store_true", help="evaluate the untrained model of --config")
    p.add_argument("--config", help="config of the model (default: the checkpoint's own; with released weights "
                                    "the defaults, the file fixing the backbone)")
    p.add_argument("--train", help="labelled image folder or shards, or builtin:NAME:train (default for built-in "
                                   "data; required with released weights)")
    p.add_argument("--val", help="labelled image folder, or builtin:NAME:val (default for built-in data)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for decoding images")
    p.add_argument("--out", help="JSON result path (default: next to the checkpoint)")
    p.add_argument("--features", choices=["cls", "cls+patch"], default="cls",
                   help="cls token, or cls token and mean patch token concatenated")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast of the forward (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher", help="backbone to evaluate")
    p.add_argument("overrides", nargs="*", help="config overrides (on the checkpoint's config or --config)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # reports record the command that reproduces them
    # Each command imports its modules when it runs: `ibot --help`, a config error or `ibot plot` do not pay for
    # torch, torchvision and the model (seconds on a small machine).
    try:
        if args.command == "train":
            from ibot_engine.train.loop import train

            train(load_config(args.config, args.overrides))
        elif args.command == "demo":
            from ibot_engine.tools.demo import run_demo

            run_demo(load_config(args.config, args.overrides))
        elif args.command == "eval":
            from ibot_engine.eval.command import knn_main, linear_main

            (knn_main if args.eval_command == "knn" else linear_main)(args)
        elif args.command == "export":
            from ibot_engine.tools.export import export_main

            export_main(args)
        elif args.command == "visualize":
            from ibot_engine.tools.visualize import visualize_main

            visualize_main(args)
        elif args.command == "shards":
            from ibot_engine.data.shards.write import write_shards

            manifest = write_shards(
                args.src, args.out, max_count=args.max_count, max_size=args.max_size, max_side=args.max_side,
                workers=args.workers, prefix=args.prefix, progress=sys.stdout.isatty(),
            )
            print(f"{manifest['total']} images in {len(manifest['shards'])} shards under {args.out}; "
                  f"{len(manifest['skipped'])} unreadable files skipped (listed in manifest.json)")
        elif args.command == "bench":
            from ibot_engine.bench.command import bench_main

            bench_main(args, load_config(args.config, args.overrides))
        elif args.command == "profile":
            from ibot_engine.bench.profile import profile_main

            profile_main(args, load_config(args.config, args.overrides))
        elif args.command == "plot":
            from ibot_engine.tools.plot import plot_health_run, plot_knn_run, plot_run

            print(plot_run(args.run_dir, args.out))
            for png in (plot_knn_run(args.run_dir), plot_health_run(args.run_dir)):
                if png is not None:
                    print(png)
    except ConfigError as err:
        print(f"ibot: config error: {err}", file=sys.stderr)
        return 2
    except Preempted as stopped:  # a stop signal: checkpoint written, the launcher may requeue (exit code 75)
        print(f"ibot: {stopped}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except (ValueError, FileNotFoundError) as err:
        print(f"ibot: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
