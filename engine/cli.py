"""`ibot` command line (also `python -m engine`, which torchrun uses).

    ibot train --config launch/configs/vit_s16.yaml optim.lr=1e-3 data.path=/data/in1k/train
    ibot demo                      # ViT-tiny on the built-in dataset: k-NN before/after, throughput, loss curve
    ibot eval knn --checkpoint RUN_OR_FILE
    ibot plot RUN_DIR              # loss curve PNG from metrics.jsonl
    ibot shards write SRC OUT      # WebDataset shards + manifest.json (train with data.shards=OUT)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import ConfigError, load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "launch" / "configs" / "demo_cpu.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibot", description="iBOT self-supervised pretraining of ViTs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (resumes from the run directory's latest checkpoint by default)")
    p.add_argument("--config", help="YAML preset, e.g. launch/configs/vit_s16.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")

    p = sub.add_parser("demo", help="pretrain a ViT-tiny on the built-in dataset; k-NN before and after")
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    ev = p.add_subparsers(dest="eval_command", required=True)
    k = ev.add_parser("knn", help="weighted k-NN on teacher cls features (DINO protocol)")
    k.add_argument("--checkpoint", help="checkpoint file or run directory (omit with --random-init)")
    k.add_argument("--random-init", action="store_true", help="evaluate the untrained model of --config")
    k.add_argument("--config", help="config of the model (default: the checkpoint's own)")
    k.add_argument("--train", help="labelled image folder, or builtin:NAME:train (default for built-in data)")
    k.add_argument("--val", help="labelled image folder, or builtin:NAME:val (default for built-in data)")
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--batch-size", type=int, default=128)
    k.add_argument("--out", help="JSON result path (default: next to the checkpoint)")
    k.add_argument("overrides", nargs="*")

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

    p = sub.add_parser("plot", help="draw the loss curve of a run to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from engine.train import train

            train(load_config(args.config, args.overrides))
        elif args.command == "demo":
            from engine.demo import run_demo

            run_demo(load_config(args.config, args.overrides))
        elif args.command == "eval":
            from engine.evaluate import knn_main

            knn_main(args)
        elif args.command == "shards":
            from engine.data.shards import write_shards

            manifest = write_shards(
                args.src, args.out, max_count=args.max_count, max_size=args.max_size, max_side=args.max_side,
                workers=args.workers, prefix=args.prefix, progress=sys.stdout.isatty(),
            )
            print(f"{manifest['total']} images in {len(manifest['shards'])} shards under {args.out}; "
                  f"{len(manifest['skipped'])} unreadable files skipped (listed in manifest.json)")
        elif args.command == "plot":
            from engine.plot import plot_run

            print(plot_run(args.run_dir, args.out))
    except ConfigError as err:
        print(f"ibot: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"ibot: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
