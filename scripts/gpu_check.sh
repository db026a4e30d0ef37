#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (H100/H200), in priority order under a wall-clock budget.
#
#   bash scripts/gpu_check.sh [--budget-s 480] [--out DIR] [--parts tests,steps,e2e,kernels]
#   bash scripts/gpu_check.sh --dry-run         # the same code path on the CPU with the tiny presets (CI runs it)
#
# Needs only a CUDA build of torch and Triton; no network. Wheels for the optional packages (open_clip_torch and
# ftfy for the text encoder, diffusers for the peer baseline) may be shipped in ./wheels or $GPU_CHECK_WHEELS:
# they are installed with `pip install --no-index` into a folder under the temp dir, never into the environment.
# Results are written the moment they exist: DIR/results.jsonl, DIR/summary.md, DIR/pytest-gpu.log
# (default DIR: benchmarks/results/gpu-check-<UTC stamp>-<device>-<sha>; a dry run: out/gpu-check/). What each
# part does and costs: benchmarks/README.md.
set -uo pipefail
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}  # the budget counts from here: imports and installs included
cd "$(dirname "$0")/.."
export GPU_CHECK_COMMAND="bash scripts/gpu_check.sh $*"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
case " $* " in
    *" --dry-run "*) export TRITON_INTERPRET=1 ;;  # kernels through Triton's interpreter on the CPU
    *) unset TRITON_INTERPRET ;;
esac

WHEELS=${GPU_CHECK_WHEELS:-wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE=${TMPDIR:-/tmp}/cascade-rt-gpu-check-site
    if [ ! -f "$SITE/.installed" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
            && touch "$SITE/.installed" \
            || echo "gpu_check: installing the wheels in $WHEELS failed; going on without them" >&2
    fi
    [ -f "$SITE/.installed" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# cascade-rt runs from this checkout. Unless it is installed from here (pip install -e .), a symlink tree under
# the temp dir gives export/, kernels/ and benchmarks/ their package names (pyproject.toml's package-dir).
if ! "$PY" -c "import sys, cascade_rt.benchmarks.gpu_check as m; sys.exit(not m.__file__.startswith('$PWD/'))" \
        2> /dev/null; then
    SRC=${TMPDIR:-/tmp}/cascade-rt-gpu-check-src
    rm -rf "$SRC" && mkdir -p "$SRC/cascade_rt"
    for f in cascade_rt/*; do ln -s "$PWD/$f" "$SRC/cascade_rt/"; done
    for d in export kernels benchmarks; do ln -s "$PWD/$d" "$SRC/cascade_rt/$d"; done
    export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" -m cascade_rt.benchmarks.gpu_check "$@"
