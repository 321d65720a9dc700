#!/usr/bin/env bash
# docs/continue.md's measurements (dinov2 issue #204 on builtin:digits): the demo's pretraining, its teacher backbone
# exported backbone-only in the DINOv2 layout, then continued 200 steps on the same data with a k-NN every 20 steps:
# with the continuation defaults and the naive path beside it, on the demo's recipe and on the engine's ImageNet
# defaults, and at 64 px.
# About 4 minutes per 32 px run on 2 CPU cores (res64: about 7.5). Usage: bash launch/examples/continue_digits.sh [OUT] [RUN ...]
# (RUN: pretrain defaults naive imagenet imagenet_naive res64; all by default). Needs `bash launch/demo.sh`'s .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/continue_digits}
shift || true
RUNS=("${@:-pretrain defaults naive imagenet imagenet_naive res64}")
IBOT=.venv/bin/ibot
FILE="$OUT/demo_dinov2.pth"
# The demo's recipe (it sets optim.lr, so the continuation defaults apply to the layer decay, the patch-embedding
# lr, the backbone freeze, the backbone's lr ramp after it and the centres).
DEMO=(--config engine/configs/demo_cpu.yaml model.init_from="$FILE" eval.knn_every=20 checkpoint.every=0)
# The engine's dataclass defaults (the official ImageNet recipe) with the demo's data and model sizes.
IMAGENET=(model.init_from="$FILE" model.arch=vit_tiny model.patch_size=8 model.img_size=32 model.out_dim=1024
          data.path=builtin:digits data.global_size=32 data.local_size=16 data.num_local=4 data.num_workers=2
          train.batch_size=64 train.steps=200 eval.knn_every=20 precision=fp32 checkpoint.every=0)
run() {
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  $IBOT train "$@" run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name: teacher k-NN top-1 every 20 steps:" \
    "$(grep -o '"knn_top1": [0-9.]*' "$OUT/$name/metrics.jsonl" | cut -c13-17 | tr '\n' ' ')"
}
mkdir -p "$OUT"
for r in ${RUNS[*]}; do
  case $r in
    pretrain)
      $IBOT train --config engine/configs/demo_cpu.yaml run.dir="$OUT/pretrain" > "$OUT/pretrain.log" 2>&1
      $IBOT export --checkpoint "$OUT/pretrain" --format dinov2 --out "$FILE" ;;
    defaults) run continue_defaults "${DEMO[@]}" train.steps=200 ;;
    naive) run continue_naive "${DEMO[@]}" train.steps=200 optim.layer_decay=1 optim.patch_embed_lr_mult=1 \
        train.freeze_backbone_steps=0 train.unfreeze_warmup_steps=0 loss.center_init=zero ;;
    imagenet) run continue_imagenet "${IMAGENET[@]}" ;;
    imagenet_naive) run continue_imagenet_naive "${IMAGENET[@]}" optim.lr=5e-4 optim.warmup_epochs=0 \
        optim.layer_decay=1 optim.patch_embed_lr_mult=1 train.freeze_backbone_steps=0 train.unfreeze_warmup_steps=0 \
        loss.center_init=zero ;;
    # At a new resolution, KoLeo off (docs/continue.md, "Changing resolution"); the rest as the defaults row.
    res64) run continue_64px "${DEMO[@]}" train.steps=100 model.img_size=64 data.global_size=64 data.local_size=32 \
        loss.koleo_weight=0 ;;
    *) echo "unknown run $r (pretrain defaults naive imagenet imagenet_naive res64)" >&2; exit 2 ;;
  esac
done
