#!/usr/bin/env bash
# iBOT pretraining with torchrun. Arguments go to `ibot train`.
#
# One node, all its GPUs (NPROC defaults to the GPU count, 1 without GPUs):
#   bash launch/torchrun.sh --config launch/configs/vit_s16.yaml distributed.strategy=ddp run.dir=runs/vits
# Several nodes: run the same command on every node with NNODES and a rendezvous endpoint on one of them
# (c10d rendezvous; node ranks are assigned by the rendezvous, so every node runs the identical command):
#   NNODES=4 RDZV_ENDPOINT=node001:29400 bash launch/torchrun.sh --config launch/configs/vit_b16.yaml \
#       distributed.strategy=fsdp run.dir=/shared/runs/vitb
# Elastic restarts: MAX_RESTARTS=3 restarts every rank after a failure (up to 3 times); the restarted ranks
# resume from the latest complete checkpoint (checkpoint.resume=auto), so set checkpoint.every.
#
# Environment: NPROC, NNODES (default 1), RDZV_ENDPOINT (required with NNODES > 1), RDZV_ID (default ibot),
# MAX_RESTARTS (default 0), PYTHON (default python3), OMP_NUM_THREADS (torchrun's default is 1).
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=1
fi
if [ "$NNODES" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  rendezvous=(--standalone)
else
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (a node all nodes can reach) when NNODES > 1}"
  rendezvous=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-ibot}")
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" "${rendezvous[@]}" \
  --max_restarts="${MAX_RESTARTS:-0}" -m ibot_engine train "$@"
