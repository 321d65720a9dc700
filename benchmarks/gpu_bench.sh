#!/usr/bin/env bash
# Issue 6's GPU measurements in one prepared call: `ibot bench --compare lightly` for ViT-S/16 and ViT-B/16 (the
# targets.md workload: bf16, 2 x 224 + 10 x 96, K = 8192, batch 64, compiled blocks), the largest ViT-B/16 batch of
# ours and of lightly's, and one `ibot profile` of ViT-S/16. About 10 minutes of device time on an H100.
# Before the call, on the CPU machine: `bash benchmarks/prepare_gpu_carry.sh` (it also fetches the lightly wheel),
# then carry `gpu_carry`. On the device machine, from the repository root:
#     bash benchmarks/gpu_bench.sh            # reports land in $OUT (the device tool's folder) or /tmp/gpu_bench
# Copy the bench_*.md / .json reports from $OUT into benchmarks/results/ (they carry card, versions, date, command).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
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
    tail -n 15 "$OUT/$name.log"
    NAMES+=("$name"); CODES+=("$rc"); SECS+=("$((SECONDS - t0))")
}
# The workload of targets.md; synthetic batches on the GPU, one process.
W="precision=bf16 distributed.strategy=none train.batch_size=64"
DAY=$(date -u +%Y%m%d)

step bench_vit_s16 240 python -m engine bench --config launch/configs/vit_s16.yaml $W train.compile=true \
    --steps 30 --warmup 10 --compare lightly --out "$OUT/bench_vit_small16_b64_compare_lightly_$DAY.md"
step bench_vit_b16 240 python -m engine bench --config launch/configs/vit_b16.yaml $W train.compile=true \
    --steps 30 --warmup 10 --compare lightly --out "$OUT/bench_vit_base16_b64_compare_lightly_$DAY.md"
# Largest batch: eager (no recompilation per tried size), 2 steps per try, capped at 4096 images.
step max_batch_vit_b16 300 python -m engine bench --config launch/configs/vit_b16.yaml $W train.compile=false \
    --steps 3 --warmup 1 --compare lightly --find-max-batch --max-batch 4096 \
    --out "$OUT/bench_vit_base16_max_batch_$DAY.md"
step profile_vit_s16 180 python -m engine profile --config launch/configs/vit_s16.yaml $W train.compile=true \
    --wait 1 --warmup 1 --active 2 --out "$OUT/profile_vit_s16"
# The TensorBoard copy duplicates trace.json; ship one compressed trace.
rm -rf "$OUT/profile_vit_s16/tb" && gzip -f "$OUT/profile_vit_s16/trace.json" 2>/dev/null

echo
printf '%-18s %6s %6s\n' step rc seconds
for i in "${!NAMES[@]}"; do printf '%-18s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"; done
