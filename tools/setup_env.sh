#!/usr/bin/env bash
# Create .venv and install the project's pinned dependencies.
#   bash tools/setup_env.sh          runtime only (training, inference)
#   bash tools/setup_env.sh --dev    plus the test dependencies and the offline LoRA-loader references
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  $PIP install -r requirements-dev.txt
  if [ -f requirements-interop.txt ]; then
    # Loader references installed without their (huge, torchvision-pulling) dependency trees.
    $PIP install --no-deps -r requirements-interop.txt
  fi
fi
