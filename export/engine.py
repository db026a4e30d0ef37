"""The engine protocol the runtime programs against, and `open_engine` (manifest -> loaded engine).

Lifecycle (after the TensorRT demo, without its per-method branches):

    build    export/build.py turns a model into engine files + manifest (needs the model code)
    load     `Engine.load()` deserialises the files (needs no model code: the spec travels in the manifest)
    infer    `engine(**inputs) -> {output_name: tensor}`, names/shapes/dtypes from `engine.spec`

TensorRT splits load further into activate (execution context, device memory) and allocate (bound buffers);
see `trt_engine.TrtEngine`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from cascade_rt.errors import ConfigError, EngineError
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.specs import StageSpec


@runtime_checkable
class Engine(Protocol):
    spec: StageSpec
    manifest: Manifest | None

    def load(self) -> None:
        """Deserialise / open the engine files (idempotent)."""

    def __call__(self, feed: Mapping[str, Tensor] | None = None, /, **inputs: Tensor) -> dict[str, Tensor]:
        """Run once: inputs (a mapping or keywords) and outputs named, shaped and typed as `spec` says."""


def named_inputs(feed: Mapping[str, torch.Tensor] | None, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engines accept `engine({"x": x, ...})` and `engine(x=x, ...)`."""
    return {**(feed or {}), **inputs}


def check_inputs(spec: StageSpec, precision: str, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """Validate names, shapes and dtypes against the spec; returns the bound symbol values."""
    values = spec.bind(inputs)
    dtypes = spec.dtypes(precision)
    for name, t in inputs.items():
        if t.dtype != dtypes[name]:
            raise ConfigError(f"{spec.stage}: input {name!r} is {t.dtype}, the engine takes {dtypes[name]}")
    return values


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
        from cascade_rt.export.ort_engine import OrtEngine

        engine: Engine = OrtEngine(
            path, spec, manifest.precision, manifest=manifest, device=device or "cpu",
            intra_op_threads=options.get("intra_op_threads"), opt_level=options.get("opt_level", "all"),
        )  # fmt: skip
    elif manifest.format == "aoti":
        from cascade_rt.export.aoti_engine import AotiEngine

        engine = AotiEngine(path, spec, manifest.precision, manifest=manifest, device=device)
    elif manifest.format == "tensorrt":
        from cascade_rt.export.trt_engine import TrtEngine

        budget = options.get("weight_streaming_budget")
        engine = TrtEngine(path, spec, manifest.precision, manifest=manifest, weight_streaming_budget=budget)
    else:
        raise EngineError(f"{manifest_path}: unknown engine format {manifest.format!r}")
    if load:
        engine.load()
    return engine
