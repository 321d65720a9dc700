#!/usr/bin/env bash
# Fresh machine to a pretrained ViT-tiny: install into .venv, then `ibot demo` (k-NN before/after, throughput,
# loss curve in runs/demo/loss.png). Extra arguments are config overrides, e.g. `bash launch/demo.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[digits]"
exec .venv/bin/ibot demo "$@"
