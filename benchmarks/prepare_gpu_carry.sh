#!/usr/bin/env bash
# Fill the git-ignored gpu_carry/ with what benchmarks/gpu_check.sh needs on the device machine that its image
# lacks, and nothing else: the image has Python 3.12, torch 2.11 + CUDA 13, triton 3.6, torchvision, timm, lightning,
# pytest, pyyaml, rich, safetensors, scikit-image, tqdm; it lacks webdataset, braceexpand, lightly and pytest-timeout
# (pyproject.toml's per-test `timeout`). OpenCV (data.augment=cpu) does not travel: its wheel alone is 58 MB, so the
# data benchmark there skips the data.augment=cpu rows unless the image has it, and the FSDP smoke trains with
# data.augment=gpu. Wheels only, for CPython 3.12 on x86_64 Linux; gpu_check.sh installs them
# with `pip install --no-index --no-deps --target` and fails loudly if that fails. Nothing travels from ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu_carry/wheels && mkdir -p gpu_carry/wheels
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --implementation cp -d gpu_carry/wheels webdataset braceexpand pytest-timeout
# lightly for `ibot bench --compare lightly`: pure Python; its lightly.loss / lightly.models imports need none of its
# declared dependencies beyond torch, torchvision and timm (all in the image), so it travels --no-deps.
python -m pip download -q --no-deps --only-binary=:all: -d gpu_carry/wheels "lightly==1.6.0"
du -sh gpu_carry

# Realistic JPEG shards for the data benchmark (benchmarks/make_shards.py reads scikit-image's bundled photographs;
# the device machine cannot download it). 600 images (~30 MB) keep the carried tree under the device's 64 MiB.
if [ ! -f gpu_carry/bench_shards/manifest.json ]; then
    skimage_dir=$(mktemp -d)
    python -m pip download -q --no-deps --only-binary=:all: -d "$skimage_dir" scikit-image
    python -m pip install -q --no-deps --target "$skimage_dir/pkg" "$skimage_dir"/scikit_image-*.whl
    PYTHONPATH="$PWD:$skimage_dir/pkg" python -m ibot_benchmarks.make_shards gpu_carry/bench_shards --images 600 --max-count 200
    rm -rf "$skimage_dir"
fi
du -sh gpu_carry
