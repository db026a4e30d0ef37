#!/usr/bin/env bash
# Create or reuse ./.venv and install cascade-rt with everything its tests and main job need.
# Idempotent: a stamp records the pyproject hash, so a second run costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cascade-rt-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # torch first, pinned: this version lies on the build machines' disk (CUDA build, runs on CPU too).
  .venv/bin/python -m pip install -q "torch==${CASCADE_RT_TORCH:-2.14.1}" "torchvision==${CASCADE_RT_TORCHVISION:-0.29.1}" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, onnx, onnxruntime, cascade_rt" 
  echo "$want" > "$stamp"
fi
