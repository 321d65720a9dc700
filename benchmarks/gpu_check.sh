#!/usr/bin/env bash
# The prepared GPU check (DEVELOPERS.md: ~15 min of device time per session).
# On the device machine, from the repository root, one part per call (each under the 10-minute per-call limit;
# parts in priority order, since a session's device time covers about two):
#     bash benchmarks/gpu_check.sh 1    # correctness on CUDA; ibot bench --compare lightly, ViT-S/16 and ViT-B/16
#     bash benchmarks/gpu_check.sh 2    # largest ViT-B batch vs lightly's; attention and kernel benchmarks; profile
#     bash benchmarks/gpu_check.sh 3    # data benchmark on JPEG shards; torch vs apex fused ops; FSDP2 NCCL smoke
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
DAY=$(date -u +%Y%m%d)
W="precision=bf16 distributed.strategy=none train.batch_size=64"  # the goal workload of one H100; synthetic batches on the GPU
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    # Correctness on CUDA: kernels (bf16/fp16 error vs the reference run, large K, opcheck + compile), attention
    # backends vs SDPA (outputs and gradients, packed and unpacked), apex vs torch when apex is there, data ops.
    step gpu_tests 120 python -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/kernels \
        tests/model/test_attention.py tests/model/test_efficiency.py tests/data/test_gpu_aug.py tests/data/test_shards.py
    # The step (issue 6 goals): ViT-S/16 and ViT-B/16, B = 64, bf16, 2 x 224 + 10 x 96, K = 8192, compiled blocks,
    # against lightly's iBOT example step (bf16, masks outside the step, compiled blocks) in the same process.
    step bench_vit_s16 210 python -m engine bench --config launch/configs/vit_s16.yaml $W train.compile=true \
        --steps 30 --warmup 10 --compare lightly --out "$OUT/bench_vit_small16_b64_compare_lightly_$DAY.md"
    step bench_vit_b16 210 python -m engine bench --config launch/configs/vit_b16.yaml $W train.compile=true \
        --steps 30 --warmup 10 --compare lightly --out "$OUT/bench_vit_base16_b64_compare_lightly_$DAY.md"
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    # Largest ViT-B/16 batch, ours and lightly's (goal: >= 2x): eager (no recompiling per size), capped at 4096.
    step max_batch_vit_b16 200 python -m engine bench --config launch/configs/vit_b16.yaml $W train.compile=false \
        --steps 3 --warmup 1 --compare lightly --find-max-batch --max-batch 4096 \
        --out "$OUT/bench_vit_base16_max_batch_$DAY.md"
    # Attention backends, op and backbone, packed and unpacked (eager; compiled rows cost minutes of compiling).
    step attention_bench 100 python -m benchmarks.attention --no-compile --out "$OUT/attention_$DAY.md"
    # Kernel benchmark (issue 3): Triton vs eager vs torch.compile, the shapes, against the copy bandwidth.
    step kernel_bench 120 python -m benchmarks.kernels --out "$OUT/kernels_$DAY.md"
    step profile_vit_s16 100 python -m engine profile --config launch/configs/vit_s16.yaml $W \
        --wait 1 --warmup 1 --active 2 --out "$OUT/profile_vit_s16"
    rm -rf "$OUT/profile_vit_s16/tb" && gzip -f "$OUT/profile_vit_s16/trace.json" 2>/dev/null  # one trace, compressed
fi
if [ "$PART" = 3 ] || [ "$PART" = all ]; then
    # Data path (issue 4): img/s vs workers on real JPEG shards, CPU and GPU augmentation.
    step data_bench 200 python -m benchmarks.data --shards gpu_carry/bench_shards --workers 0,8,16 --batches 10 \
        --out "$OUT/data_$DAY.md"
    # torch's fused AdamW / LayerNorm vs apex's, when the image has NVIDIA apex (issue 6: keep the faster).
    step fused_ops 60 python -m benchmarks.fused_ops --out "$OUT/fused_ops_$DAY.md"
    # NCCL smoke (issue 5): 1 GPU, world size 1, FSDP2 + bf16, through torchrun and the real command line.
    step fsdp_smoke 90 torchrun --standalone --nproc-per-node=1 -m engine train --config launch/configs/demo_cpu.yaml \
        distributed.strategy=fsdp precision=bf16 train.steps=30 train.log_every=10 checkpoint.every=30 \
        run.dir=/tmp/gpu_check_fsdp_smoke
fi

echo
printf '%-16s %6s %6s\n' step rc seconds
for i in "${!NAMES[@]}"; do printf '%-16s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"; done
