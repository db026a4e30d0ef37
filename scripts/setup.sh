#!/usr/bin/env bash
# Create or reuse ./.venv and install cascade-rt with everything its tests, server and benchmarks need, at the
# versions in constraints.txt (the ones the test suite last passed with; upgrading is a deliberate commit that
# edits that file). Idempotent: a stamp records the hash of the inputs, so a second run costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cascade-rt-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
  pip install -q "pip==26.3"
  # torch first: its CUDA build also runs on a CPU, and pulling it alone keeps the resolver's work small
  pip install -q -c constraints.txt torch torchvision
  pip install -q -c constraints.txt -e ".[dev,serve]"
  .venv/bin/python -c "import torch, onnx, onnxruntime, fastapi, ray, cascade_rt"
  echo "$want" > "$stamp"
fi
