#!/usr/bin/env bash
# On a lent GPU machine (device tool), from the repository root: install the carried wheels (no network there),
# then run one step of the GPU plan. Each step fits one 10-minute device command; results
# are written to benchmarks/results/ and copied to $OUT (what the device tool brings back).
#
#   here:   bash scripts/device_wheels.sh                      # once: ./.whl (ignored by git, ~7 MB)
#   device: run(command="bash scripts/device_session.sh STEP", carry=[".whl"])
#
# Steps, in the order a GPU session should run them (see benchmarks/README.md):
#   tests      pytest -m gpu over the whole suite (kernels on the GPU, graph replay, memory modes)
#   kernels    per-kernel microbenchmarks vs eager and torch.compile, Stage C/B step times, CUDA graphs
#   runtime    benchmarks/gpu_runtime_check.py --presets lite,full (graphs vs eager, timings, memory modes)
#   bench-big  cascade-rt bench, standard workload, big presets: eager, compile (+graphs), diffusers peers
#   bench-lite cascade-rt bench, standard workload, lite presets: eager, compile, triton (+graphs)
#   bench-aot  cascade-rt bench, standard workload, big presets: aoti, onnxruntime, max-autotune
#   serve      cascade-rt bench-serve: the images server under load, lite random weights, 1024x1024
#   smoke      a seconds-long check that the install works and the GPU is seen
set -uo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: device_session.sh tests|kernels|runtime|bench-big|bench-lite|bench-aot|serve|smoke}
OUT=${OUT:-$PWD/out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

SITE=/tmp/cascade-site
mkdir -p "$SITE"
if [ ! -f "$SITE/.installed" ]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || { echo "installing the carried wheels failed"; exit 3; }
    else
        echo "no .whl/ carried: open_clip / diffusers may be missing (run scripts/device_wheels.sh here, carry .whl)"
    fi
    touch "$SITE/.installed"
fi
# cascade-rt itself runs from this checkout, uninstalled (cascade_rt/__init__.py maps export/, kernels/ and
# benchmarks/ to their package names there); run from the repository root, as bench --record expects.
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=python3
CLI=("$PY" -m cascade_rt.cli)
results_before=$(mktemp)  # a timestamp: files newer than it are this step's

collect() {  # what this step added to benchmarks/results -> one archive in $OUT (the device tool returns 8 files)
    local new
    new=$(cd benchmarks/results && find . -newer "$results_before" -type f | sed 's|^\./||')
    [ -n "$new" ] && tar -czf "$OUT/results-$STEP.tgz" -C benchmarks/results $new && echo "results: $OUT/results-$STEP.tgz"
}
trap collect EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

BENCH=("${CLI[@]}" bench --workload standard --batch 1 --b-cfg 1.1 --budget-s 480 --record)
case "$STEP" in
    smoke)
        "$PY" -c "import cascade_rt, cascade_rt.kernels, cascade_rt.export, cascade_rt.benchmarks, open_clip; print('ok')"
        ;;
    tests)
        "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/pytest-gpu.log"
        ;;
    kernels)
        "$PY" -m cascade_rt.benchmarks.bench_kernels --graphs 2>&1 | tee "$OUT/bench-kernels.log"
        ;;
    runtime)
        "$PY" benchmarks/gpu_runtime_check.py --presets lite,full 2>&1 | tee "$OUT/runtime-check.log"
        ;;
    bench-big)
        "${BENCH[@]}" --presets big --backends eager,compile --graphs --peers diffusers,diffusers-compile \
            2>&1 | tee "$OUT/bench-big.log"
        ;;
    bench-lite)
        "${BENCH[@]}" --presets lite --backends eager,compile,triton --graphs --peers diffusers \
            2>&1 | tee "$OUT/bench-lite.log"
        ;;
    bench-aot)
        "${BENCH[@]}" --presets big --backends aoti,onnxruntime --peers max-autotune \
            2>&1 | tee "$OUT/bench-aot.log"
        ;;
    serve)
        "${CLI[@]}" bench-serve --random-weights --preset lite --dtype bf16 --sizes 1024x1024 --max-batch 4 \
            --concurrency 1,2,4,8 --max-wait-ms 0,20 --steps-c 20 --steps-b 10 --requests 16 --record \
            2>&1 | tee "$OUT/bench-serve.log"
        ;;
    *)
        echo "unknown step $STEP"; exit 2 ;;
esac
