#!/usr/bin/env bash
# Install the project with its dev extras into .venv (from the project's own files) and run the default suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m slow` or `bash launch/test.sh tests/test_objective.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
exec .venv/bin/python -m pytest "$@"
