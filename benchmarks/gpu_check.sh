#!/usr/bin/env bash
# The one prepared GPU check (DEVELOPERS.md: ~15 min of device time per session, run once, fix, rerun once).
# On the device machine, from the repository root, in two calls of under 10 minutes each (the per-call limit):
#     bash benchmarks/gpu_check.sh 1    # correctness on CUDA + the step benchmark against lightly (issues 3, 6)
#     bash benchmarks/gpu_check.sh 2    # kernel, attention and data benchmarks, the FSDP2 smoke (issues 3, 4, 5, 6)
# Reports land in $OUT (the device tool's folder) or /tmp/gpu_check.
# Before the call, on the CPU machine: `bash benchmarks/prepare_gpu_carry.sh`, then carry `gpu_carry`.
# Every step has its own timeout and a failing step does not stop the next one; the summary table at the end
# says which passed. Copy the reports from $OUT into benchmarks/results/ (they carry card, versions, date, command).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
LOGS=/tmp/gpu_check_logs  # full logs stay on the machine: the device tool brings back at most 8 files from $OUT
mkdir -p "$OUT" "$LOGS"
exec > >(tee -a "$OUT/gpu_check_part${1:-all}.log") 2>&1  # this console (with each step's tail) comes back
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "gpu_carry/wheels/*.whl" >/dev/null; then
    python -m pip install -q --no-deps --no-index gpu_carry/wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', sys.version.split()[0])"

declare -a NAMES=() CODES=() SECS=()
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    NAMES+=("$name"); CODES+=("$rc"); SECS+=("$((SECONDS - t0))")
}

PART=${1:-all}
DATE=$(date +%Y%m)
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    # Correctness on CUDA: kernels (bf16/fp16 error vs the reference run, large K, opcheck + compile), attention
    # backends vs SDPA (outputs and gradients, packed and unpacked), apex vs torch when apex is there.
    step gpu_tests 150 python -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/kernels \
        tests/test_attention.py tests/test_efficiency.py tests/test_gpu_aug.py tests/test_shards.py
    # The step (issue 6 goals): ViT-S/16 and ViT-B/16, B = 64, bf16, 2 x 224 + 10 x 96, K = 8192, compiled blocks,
    # against lightly's iBOT example step (bf16, masks outside the step, compiled blocks) in the same process.
    for arch in s16 b16; do
        step "bench_$arch" 170 python -m engine bench --config "launch/configs/vit_$arch.yaml" precision=bf16 \
            train.batch_size=64 train.compile=true --steps 30 --warmup 10 --compare lightly \
            --out "$OUT/bench_vit_${arch}_$DATE.md"
    done
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    # Kernel benchmark: Triton vs eager vs torch.compile, the shapes, against the copy bandwidth.
    step kernel_bench 150 python -m benchmarks.kernels --out "$OUT/kernels_$DATE.md"
    # Attention backends, op and backbone, packed and unpacked (eager; compiled rows cost minutes of compiling).
    step attention_bench 120 python -m benchmarks.attention --no-compile --out "$OUT/attention_$DATE.md"
    # Largest ViT-B/16 batch that fits (issue 6 goal: >= 2x lightly's).
    step max_batch_b16 120 python -m engine bench --config launch/configs/vit_b16.yaml precision=bf16 \
        train.activation_checkpointing=selective --find-max-batch --max-batch 1024 --steps 3 --warmup 1 \
        --out "$OUT/maxbatch_vit_b16_$DATE.md"
    # Data path on CUDA: the GPU-side multi-crop ops vs their CPU run, then img/s vs workers on real JPEG shards.
    step data_bench 100 python -m benchmarks.data --shards gpu_carry/bench_shards --workers 0,8,16 --batches 10 \
        --out "$OUT/data_$DATE.md"
    # NCCL smoke (issue 5): 1 GPU, world size 1, FSDP2 + bf16, through torchrun and the real command line.
    step fsdp_smoke 60 torchrun --standalone --nproc-per-node=1 -m engine train --config launch/configs/demo_cpu.yaml \
        distributed.strategy=fsdp precision=bf16 train.steps=30 train.log_every=10 checkpoint.every=30 \
        run.dir=/tmp/gpu_check_fsdp_smoke
fi

echo
printf '%-16s %6s %6s\n' step rc seconds
for i in "${!NAMES[@]}"; do printf '%-16s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"; done
