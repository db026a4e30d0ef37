#!/usr/bin/env bash
# Set up (./.venv) and run the whole test suite on the CPU. Triton kernels run through the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .   # lint (pyproject.toml [tool.ruff]): fails fast, before the tests
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec .venv/bin/python -m pytest -q "$@"
