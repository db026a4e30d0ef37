"""`open_engine`: a manifest -> the loaded engine of its format (ONNX Runtime, AOTInductor, TensorRT).

No model code is needed: the spec travels in the manifest. Files are not checked here: `EngineCache.load`
checks them against the manifest first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from cascade_rt.errors import EngineError
from cascade_rt.export.aoti_engine import AotiEngine
from cascade_rt.export.engine import Engine
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.ort_engine import OrtEngine
from cascade_rt.export.specs import StageSpec
from cascade_rt.export.trt_engine import TrtEngine


def open_engine(manifest_path: str | Path, *, device: str | torch.device | None = None, load: bool = True) -> Engine:
    """The engine a manifest describes, of the right class for its format (no model code needed).
    Files are not checked here: `EngineCache.load` checks them against the manifest first."""
    manifest_path = Path(manifest_path)
    manifest = Manifest.read(manifest_path)
    return open_engine_files(manifest_path.parent, manifest, device=device, load=load)


def open_engine_files(
    directory: str | Path,
    manifest: Manifest,
    *,
    device: str | torch.device | None = None,
    options: Mapping[str, Any] | None = None,
    load: bool = True,
) -> Engine:
    spec = StageSpec.from_dict(manifest.spec)
    path = Path(directory) / manifest.engine_file
    options = {**manifest.build.get("options", {}), **(options or {})}
    if device is None:
        device = "cuda" if manifest.device.get("type") == "cuda" else "cpu"
    if manifest.format in ("onnx", "onnxruntime"):
        engine: Engine = OrtEngine(
            path, spec, manifest.precision, manifest=manifest, device=device or "cpu",
            intra_op_threads=options.get("intra_op_threads"), opt_level=options.get("opt_level", "all"),
        )
    elif manifest.format == "aoti":
        engine = AotiEngine(path, spec, manifest.precision, manifest=manifest, device=device)
    elif manifest.format == "tensorrt":
        budget = options.get("weight_streaming_budget")
        engine = TrtEngine(path, spec, manifest.precision, manifest=manifest, weight_streaming_budget=budget)
    else:
        raise EngineError(f"{path}: unknown engine format {manifest.format!r}; rebuild it with cascade-rt export")
    if load:
        engine.load()
    return engine
