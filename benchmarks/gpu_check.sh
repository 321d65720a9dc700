#!/usr/bin/env bash
# The one prepared GPU check (DEVELOPERS.md: ~15 min of device time per session, run once, fix, rerun once).
# On the device machine, from the repository root:
#     bash benchmarks/gpu_check.sh            # reports land in $OUT (the device tool's folder) or /tmp/gpu_check
# Before the call, on the CPU machine: `bash benchmarks/prepare_gpu_carry.sh`, then carry `gpu_carry`.
# Every step has its own timeout and a failing step does not stop the next one; the summary table at the end
# says which passed. Copy the reports from $OUT into benchmarks/results/ (they carry card, versions, date, command).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
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
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    NAMES+=("$name"); CODES+=("$rc"); SECS+=("$((SECONDS - t0))")
}

# 1. Kernel correctness on CUDA (bf16/fp16 error vs the reference run, large K, opcheck + compile).
step kernel_tests 240 python -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/kernels
# 2. Kernel benchmark: Triton vs eager vs torch.compile, the shapes, against the copy bandwidth.
step kernel_bench 300 python -m benchmarks.kernels --out "$OUT/kernels_$(date +%Y%m).md"
# 3. Data path on CUDA: the GPU-side multi-crop ops vs their CPU run, the side stream; then img/s vs workers.
step data_tests 120 python -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_gpu_aug.py tests/test_shards.py
step data_bench 300 python -m benchmarks.data --shards gpu_carry/bench_shards --workers 0,4,8,16 --batches 10 \
    --out "$OUT/data_$(date +%Y%m).md"
# 4. NCCL smoke (issue 5): 1 GPU, world size 1, FSDP2 + bf16, through torchrun and the real command line.
step fsdp_smoke 180 torchrun --standalone --nproc-per-node=1 -m engine train --config launch/configs/demo_cpu.yaml \
    distributed.strategy=fsdp precision=bf16 train.steps=30 train.log_every=10 checkpoint.every=30 \
    run.dir=/tmp/gpu_check_fsdp_smoke  # logs to $OUT/fsdp_smoke.log; the run itself stays off $OUT (8 files max)

echo
printf '%-16s %6s %6s\n' step rc seconds
for i in "${!NAMES[@]}"; do printf '%-16s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"; done
