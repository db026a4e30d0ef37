#!/usr/bin/env bash
# Set up (./.venv) and run the default benchmark on a small random-weight preset
# (eager vs every backend that runs on this machine), engines cached under engines/, report in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cascade-rt bench "$@"
