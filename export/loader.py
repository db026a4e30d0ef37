"""What the runtime calls: `load_engine(kind, stage, model, ...)` -> a loaded, validated, cached engine.

    engine = load_engine("onnxruntime", "stage_c", stage_c_model, shapes=((1, 1024, 1024),), cfg=True,
                         engine_dir="engines", device="cpu")
    eps = engine({"x": x, "r": r, "cond_kv": pack_cond_kv(cond_kv)})["eps"]

The engine for (stage, preset, format, precision, weights, shapes) is taken from the cache when its manifest
matches, else exported/built, validated against `model` and cached. With one shape and a known `cfg` the engine
is static (what CUDA graphs and TensorRT like best); otherwise one dynamic engine covers 256..2048 px and
batch 1..4 with or without CFG, with `shapes[0]` as its optimisation point. To load without the model at hand,
use `EngineCache(dir).load(EngineRequest(...))` (it refuses, with the reasons, anything that does not fit).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from cascade_rt.errors import ConfigError
from cascade_rt.export.build import FORMATS, EngineRequest, model_dtype
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.engine import Engine
from cascade_rt.export.sources import model_fingerprint, preset_of
from cascade_rt.export.specs import PRECISIONS, Dims, make_spec

logger = logging.getLogger(__name__)

_NAMES = {v: k for k, v in PRECISIONS.items()}


def load_engine(
    kind: str,
    stage: str,
    model: nn.Module,
    *,
    shapes: Sequence[tuple[int, int, int]] = ((1, 1024, 1024),),
    engine_dir: str | Path = "engines",
    model_id: str | None = None,
    device: str | torch.device = "cpu",
    cfg: bool | None = None,
    precision: str | None = None,
    force: bool = False,
    extensions: dict | None = None,
    refit: bool = False,
) -> Engine:
    """The engine of `kind` ('onnxruntime', 'tensorrt', 'aoti') for `stage` ('stage_c', 'stage_b', 'stage_a', ...)
    of `model`, built and validated on first use, cached under `engine_dir` afterwards. `extensions` (the LoRAs
    merged into `model`, the ControlNet of a 'stage_c_cnet' graph) become part of the engine's name and manifest;
    `refit` builds a TensorRT engine whose weights a LoRA switch can replace (export/refit.py)."""
    if kind not in FORMATS or kind == "onnx":
        raise ConfigError(f"engine kind must be one of onnxruntime, tensorrt, aoti; got {kind!r}")
    device = torch.device(device)
    precision = precision or _NAMES[model_dtype(model)]
    if kind == "onnxruntime" and device.type == "cpu" and precision == "bf16":
        logger.warning("ONNX Runtime's CPU provider has no bf16 kernels: building the %s engine in fp32", stage)
        precision = "fp32"
    batch, height, width = shapes[0]
    static = len(set(shapes)) == 1 and cfg is not None
    dims = Dims(batch=batch, height=height, width=width, cfg=bool(cfg) if cfg is not None else True)
    spec = make_spec(stage, model, "x")  # validates the stage name and reads the model's constants
    if not static:
        for b, h, w in shapes:  # every requested shape must fit the dynamic profile
            Dims(batch=b, height=h, width=w)
    request = EngineRequest(
        stage=spec.stage, preset=preset_of(model), format=kind, precision=precision,
        weights_hash=model_fingerprint(model), dims=dims, dynamic=not static,
        device="cuda" if device.type == "cuda" else "cpu",
        extensions=json.dumps(extensions, sort_keys=True) if extensions else "", refit=refit,
    )
    options = {"weights_source": {"model_id": model_id}}
    return EngineCache(engine_dir).ensure(request, model, force=force, options=options)
