#!/usr/bin/env bash
# The prepared GPU check. A session gets about 15 minutes of device time, machine start included, and at most 10
# minutes per command: one call fits, so the first part, `quick`, holds what matters most, in priority order, in
# at most 480 s and 8 files (what the device tool brings back). The longer parts wait for later GPU slots.
#     bash benchmarks/gpu_check.sh quick            # the 8-minute call (below)
#     bash benchmarks/gpu_check.sh quick --dry-run  # on any machine: each step, its timeout, its files; the total
#     bash benchmarks/gpu_check.sh more1            # ViT-S/16 and ViT-B/16 compiled vs lightly; largest ViT-B batch
#     bash benchmarks/gpu_check.sh more2            # compiled kernel rows, attention backends, profile
#     bash benchmarks/gpu_check.sh more3            # data workers sweep, torch vs apex fused ops, FSDP2 NCCL smoke
# Before the call, on the CPU machine: `bash benchmarks/prepare_gpu_carry.sh`, then carry `gpu_carry`.
# Every step has its own timeout and writes its report as it goes: a timeout loses only that step. Reports land in
# $OUT (the device tool's folder) or /tmp/gpu_check; copy them into benchmarks/results/ (card, versions, date and
# command are in each).
set -uo pipefail
PART=${1:-quick}
DRY=0; [ "${2:-}" = --dry-run ] && DRY=1
OUT=${OUT:-/tmp/gpu_check}
LOGS=/tmp/gpu_check_logs  # full logs stay on the machine: the console (with each step's tail) comes back
DAY=$(date -u +%Y%m%d)
declare -a NAMES=() CODES=() SECS=()
TOTAL_S=0; FILES=1  # the console log

step() {  # step NAME TIMEOUT_S "FILES WRITTEN (space-separated, under $OUT)" COMMAND...
    local name=$1 limit=$2 files=$3; shift 3
    TOTAL_S=$((TOTAL_S + limit)); FILES=$((FILES + $(wc -w <<<"$files")))
    if [ "$DRY" = 1 ]; then
        printf '%-18s %4d s  writes: %s\n    %s\n' "$name" "$limit" "${files:--}" "$*"
        return
    fi
    local t0=$SECONDS
    echo "=== $name (timeout $limit s)"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    NAMES+=("$name"); CODES+=("$rc"); SECS+=("$((SECONDS - t0))")
}

if [ "$DRY" = 0 ]; then
    mkdir -p "$OUT" "$LOGS"
    exec > >(tee -a "$OUT/gpu_check_$PART.log") 2>&1
    # Only what the image lacks travels (gpu_carry/wheels: webdataset, braceexpand, lightly, ...), installed
    # without an index or dependencies into a folder on PYTHONPATH; a failed install stops the check at once.
    if compgen -G "gpu_carry/wheels/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site gpu_carry/wheels/*.whl \
            || { echo "gpu_check: installing gpu_carry/wheels failed"; exit 1; }
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD:$PYTHONPATH"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'python', sys.version.split()[0])"
fi

W="precision=bf16 distributed.strategy=none train.batch_size=64"  # the goal workload of one GPU; synthetic batches
case "$PART" in
quick)
    # 1. Correctness on CUDA: every kernel test (the `interpreter` ones run natively here), attention, data ops.
    step tests 150 "" python -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or interpreter" tests/kernels \
        tests/model/test_attention.py tests/data/test_gpu_aug.py tests/data/test_shards.py tests/train/test_sync_guard.py
    # 2. No host sync in the step, on the device (the dispatch guard and CUDA's own sync debug mode).
    step sync_check 60 "sync_check_$DAY.md" python -m ibot_benchmarks.sync_check --out "$OUT/sync_check_$DAY.md"
    # 3. The step against lightly's, ViT-S/16, B = 64, bf16, eager (no cold compiles in this call).
    step bench_vit_s16 150 "bench_vit_small16_eager_compare_lightly_$DAY.md" python -m ibot_engine bench \
        --config launch/configs/vit_s16.yaml $W train.compile=false --steps 20 --warmup 5 --compare lightly \
        --out "$OUT/bench_vit_small16_eager_compare_lightly_$DAY.md"
    # 4. Kernels as the step calls them, Triton vs eager (no compiled rows).
    step kernel_bench 60 "kernels_$DAY.md" python -m ibot_benchmarks.kernels --providers triton,reference \
        --out "$OUT/kernels_$DAY.md"
    # 5. The GPU data path on the carried JPEG shards.
    step data_bench 60 "data_$DAY.md" python -m ibot_benchmarks.data --shards gpu_carry/bench_shards --workers 0,8 \
        --sources shards --paths cpu,gpu --train-workers "" --batches 5 --out "$OUT/data_$DAY.md"
    ;;
more1)
    step bench_vit_s16 180 "bench_vit_small16_b64_compare_lightly_$DAY.md" python -m ibot_engine bench \
        --config launch/configs/vit_s16.yaml $W train.compile=true --steps 30 --warmup 10 --compare lightly \
        --out "$OUT/bench_vit_small16_b64_compare_lightly_$DAY.md"
    step bench_vit_b16 180 "bench_vit_base16_b64_compare_lightly_$DAY.md" python -m ibot_engine bench \
        --config launch/configs/vit_b16.yaml $W train.compile=true --steps 30 --warmup 10 --compare lightly \
        --out "$OUT/bench_vit_base16_b64_compare_lightly_$DAY.md"
    step max_batch_vit_b16 120 "bench_vit_base16_max_batch_$DAY.md" python -m ibot_engine bench \
        --config launch/configs/vit_b16.yaml $W train.compile=false --steps 3 --warmup 1 --compare lightly \
        --find-max-batch --max-batch 4096 --out "$OUT/bench_vit_base16_max_batch_$DAY.md"
    ;;
more2)
    step kernel_bench_compiled 150 "kernels_compiled_$DAY.md" python -m ibot_benchmarks.kernels \
        --out "$OUT/kernels_compiled_$DAY.md"
    step attention_bench 100 "attention_$DAY.md" python -m ibot_benchmarks.attention --no-compile \
        --out "$OUT/attention_$DAY.md"
    step profile_vit_s16 100 "profile_vit_s16/summary.md profile_vit_s16/trace.json.gz" python -m ibot_engine profile \
        --config launch/configs/vit_s16.yaml $W --wait 1 --warmup 1 --active 2 --out "$OUT/profile_vit_s16"
    [ "$DRY" = 1 ] || { rm -rf "$OUT/profile_vit_s16/tb"; gzip -f "$OUT/profile_vit_s16/trace.json" 2>/dev/null; }
    ;;
more3)
    step data_bench 200 "data_workers_$DAY.md" python -m ibot_benchmarks.data --shards gpu_carry/bench_shards \
        --workers 0,8,16 --sources shards --paths official,cpu,gpu --train-workers "" --batches 10 \
        --out "$OUT/data_workers_$DAY.md"
    step fused_ops 60 "fused_ops_$DAY.md" python -m ibot_benchmarks.fused_ops --out "$OUT/fused_ops_$DAY.md"
    step fsdp_smoke 90 "" torchrun --standalone --nproc-per-node=1 -m ibot_engine train \
        --config engine/configs/demo_cpu.yaml distributed.strategy=fsdp precision=bf16 data.augment=gpu train.steps=30 \
        train.log_every=10 checkpoint.every=30 checkpoint.async_save=true run.dir=/tmp/gpu_check_fsdp_smoke
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh quick|more1|more2|more3 [--dry-run]" >&2; exit 2 ;;
esac

if [ "$DRY" = 1 ]; then
    echo "total: $TOTAL_S s, $FILES files"
    exit 0
fi
echo
printf '%-22s %6s %6s\n' step rc seconds
for i in "${!NAMES[@]}"; do printf '%-22s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"; done
