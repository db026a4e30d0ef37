#!/usr/bin/env bash
# On the build machine (has PyPI): download the wheels that the lent GPU machine lacks into ./.whl, so that a
# GPU session can carry them (device tool: carry [".whl"]). The GPU image already has torch, triton, onnx,
# onnxruntime, onnxscript, safetensors, numpy, pillow, matplotlib, pytest, regex, timm, huggingface-hub, tqdm,
# setuptools and wheel (/work/.library/device/KINDS.md); it lacks open_clip_torch (text encoders) and its ftfy,
# and diffusers (the peer baseline) and its importlib_metadata, and the server's fastapi, starlette, uvicorn and
# pydantic (it has anyio, h11, httpx, prometheus-client). Its Python is 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 diffusers==0.35.2 importlib_metadata==10.2.0 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
ls -1 .whl
echo "carry .whl and start the device command with: bash scripts/device_session.sh STEP"
