"""Engine requests and the per-format builders (model -> engine files + manifest fields + validation).

`EngineRequest` names one engine: stage, preset, format, precision, weights hash, shapes. Builders write into a
scratch directory; `cache.EngineCache` moves the files into place atomically and writes the manifest last.
Models come from `model_for(...)`: a preset with random (seeded) weights, or official weights from a folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cascade_rt.errors import BackendUnavailable, ConfigError
from cascade_rt.export.aoti_engine import compile_aoti
from cascade_rt.export.graph_modules import run_graph, stage_graph
from cascade_rt.export.manifest import Manifest, device_info, library_versions
from cascade_rt.export.onnx_export import export_onnx
from cascade_rt.export.opener import open_engine_files
from cascade_rt.export.refit import REFIT_STAGES, make_plan
from cascade_rt.export.specs import CFG_STAGES, GRAPH_COMPONENT, GRAPHS, PRECISIONS, Dims, StageSpec, make_spec
from cascade_rt.export.trt_engine import build_engine, build_settings
from cascade_rt.export.validate import validate
from cascade_rt.models.presets import build_model, get_preset
from cascade_rt.models.text import build_text_encoder
from cascade_rt.stages import MODEL_SETS, TEXT_PRESETS

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "onnxruntime", "tensorrt", "aoti")
EXTENSIONS = {"onnx": ".onnx", "onnxruntime": ".onnx", "tensorrt": ".plan", "aoti": ".pt2"}


@dataclass(frozen=True)
class EngineRequest:
    stage: str
    preset: str
    format: str
    precision: str
    weights_hash: str
    dims: Dims = Dims()
    dynamic: bool = False
    device: str = "cpu"
    extensions: str = ""  # canonical JSON of the LoRAs / ControlNet merged or exported (docs/extensions.md)
    refit: bool = False  # TensorRT built with REFIT: its LoRA weights can be replaced in memory (export/refit.py)

    def __post_init__(self) -> None:
        if self.stage not in GRAPHS:
            raise ConfigError(f"unknown stage {self.stage!r}; choose one of {', '.join(GRAPHS)}")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown engine format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.refit and self.format != "tensorrt":
            raise ConfigError(f"refit is a TensorRT build option; {self.format} engines switch LoRAs without it")
        if self.stage not in CFG_STAGES and self.dims.cfg:  # CFG does not change these graphs: one engine
            object.__setattr__(self, "dims", replace(self.dims, cfg=False))

    @property
    def name(self) -> str:
        d = self.dims
        shape = "dynamic" if self.dynamic else f"b{d.batch}-{d.height}x{d.width}"
        cfg = "-cfg" if d.cfg else ""
        weights = self.weights_hash.rpartition(":")[2][:10] or "w"  # two checkpoints of a preset: two names
        ext = f"-ext-{hashlib.sha256(self.extensions.encode()).hexdigest()[:10]}" if self.extensions else ""
        refit = "-refit" if self.refit else ""
        return f"{self.stage}-{self.preset}-{weights}-{self.precision}-{shape}{cfg}{ext}{refit}-{self.format}"

    @property
    def engine_file(self) -> str:
        return self.name + EXTENSIONS[self.format]

    def onnx_source(self) -> "EngineRequest":
        """The ONNX graph a TensorRT engine is built from (itself cached as an 'onnx' engine)."""
        return replace(self, format="onnx", device="cpu", refit=False)


def resolve_preset(group_or_name: str, stage: str) -> str:
    """'tiny'/'lite'/'full' -> this stage's preset; an exact preset name is checked against the stage."""
    family = GRAPH_COMPONENT[stage]
    if group_or_name in MODEL_SETS:
        return MODEL_SETS[group_or_name][family]
    if family == "text":
        if group_or_name not in TEXT_PRESETS:
            raise ConfigError(f"text encoder preset must be one of {TEXT_PRESETS}, got {group_or_name!r}")
        return group_or_name

    if get_preset(group_or_name).stage != family:
        raise ConfigError(f"preset {group_or_name!r} is not a {family!r} model (stage {stage})")
    return group_or_name


def random_model(preset: str, precision: str, seed: int = 0, device: str = "meta") -> nn.Module:
    """A preset with random (seeded) weights; on 'meta' only shapes (what the spec needs)."""
    dtype = PRECISIONS[precision]
    if preset in TEXT_PRESETS:
        return build_text_encoder(preset, device=device, dtype=dtype, seed=seed)

    return build_model(preset, device=device, dtype=dtype, seed=None if device == "meta" else seed)


def spec_for(stage: str, preset: str) -> StageSpec:
    """The spec of a preset's stage, from a meta-device build (no memory, no weights)."""
    return make_spec(stage, random_model(preset, "fp32", device="meta"), preset)


def default_precision(spec: StageSpec, fmt: str) -> str:
    """TensorRT: the stage's official precision (bf16 for text, C and B); CPU formats: fp32 (ORT's CPU provider
    has no bf16 kernels; AOTInductor's bf16 on a CPU is slow and loose)."""
    return spec.default_precision if fmt == "tensorrt" else "fp32"


def base_manifest(request: EngineRequest, spec: StageSpec) -> Manifest:
    """The manifest fields a request determines (identity + environment): what a cached engine must match."""
    return Manifest(
        stage=request.stage, preset=request.preset, format=request.format, precision=request.precision,
        weights_hash=request.weights_hash, spec=spec.to_dict(),
        dims={"batch": request.dims.batch, "height": request.dims.height, "width": request.dims.width,
              "cfg": request.dims.cfg},
        dynamic=request.dynamic,
        profile={k: [list(s) for s in v] for k, v in spec.profile(request.dims, request.dynamic).items()},
        engine_file=request.engine_file, versions=library_versions(), device=device_info(request.device),
        extensions=json.loads(request.extensions) if request.extensions else {}, refit=request.refit,
    )


def validation_dims(request: EngineRequest) -> list[Dims]:
    """Static engines: their shape. Dynamic ones: the opt shape and the smallest one of the profile."""
    dims = [request.dims]
    if request.dynamic:
        dims.append(Dims(batch=1, height=256, width=256, cfg=request.dims.cfg))
    return dims


def run_validation(engine: Callable, model: nn.Module, spec: StageSpec, request: EngineRequest) -> dict[str, Any]:
    graph = stage_graph(spec.stage, model)

    model_device = next(model.parameters()).device

    def reference(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:  # the eager graph, wherever the model is
        return run_graph(graph, spec, {k: v.to(model_device) for k, v in inputs.items()})

    reports = [
        validate(engine, reference, spec, d, request.precision, device=request.device) for d in validation_dims(request)
    ]
    merged = reports[0]
    for extra in reports[1:]:
        merged.setdefault("more", []).append(extra)
        merged["errors"] += extra["errors"]
        if extra["status"] == "failed":
            merged["status"] = "failed"
    return merged


def build_files(
    request: EngineRequest,
    model: nn.Module,
    workdir: Path,
    *,
    onnx_source: Path | None = None,
    timing_cache: Path | None = None,
    options: dict[str, Any] | None = None,
) -> Manifest:
    """Build `request` from `model` into `workdir`; validate it there; return its (unwritten) manifest."""
    options = dict(options or {})
    weights_source = options.pop("weights_source", None)  # how `engines verify` rebuilds the eager model
    spec = make_spec(request.stage, model, request.preset)
    spec.check_precision(request.precision)
    if model_dtype(model) != PRECISIONS[request.precision]:
        model = copy.deepcopy(model).to(PRECISIONS[request.precision])
    manifest = base_manifest(request, spec)
    manifest.build["weights_source"] = weights_source
    out = workdir / request.engine_file
    start = time.perf_counter()
    if request.format in ("onnx", "onnxruntime"):
        result = export_onnx(model, spec, out, dims=request.dims, dynamic=request.dynamic, opset=options.get("opset"))
        files = [f.name for f in result.files]
        manifest.build.update(opset=result.opset, external_data=result.external_data, ops=result.ops)
        if request.stage in REFIT_STAGES:  # where each LoRA target landed in the graph (export/refit.py)
            manifest.build["refit_plan"] = make_plan(out, model).to_dict()
    elif request.format == "aoti":
        compile_aoti(model, spec, out, dims=request.dims, dynamic=request.dynamic, device=request.device)
        files = [out.name]
    else:
        if onnx_source is None:
            raise ConfigError("a TensorRT build needs its ONNX graph (EngineCache builds it first)")
        settings = build_settings(spec, request.dims, request.dynamic, **{**options, "refit": request.refit})
        manifest.build.update(settings=settings, **build_engine(onnx_source, out, settings, timing_cache=timing_cache))
        if request.refit:  # TensorRT keeps the ONNX initializer names: the graph's plan is the engine's
            manifest.build["refit_plan"] = make_plan(onnx_source, model).to_dict()
        files = [out.name]
    manifest.build.update(seconds=round(time.perf_counter() - start, 2), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest.record_files(workdir, files)
    manifest.validation = validate_built(request, spec, model, workdir, manifest, options)
    return manifest


def validate_built(
    request: EngineRequest, spec: StageSpec, model: nn.Module, workdir: Path, manifest: Manifest, options: dict
) -> dict[str, Any]:
    try:
        engine = open_engine_files(workdir, manifest, device=request.device, options=options)
    except BackendUnavailable as exc:  # e.g. a bf16 ONNX graph on a machine with only ORT's CPU provider
        logger.warning("%s is not validated: %s", request.engine_file, exc)
        return {"status": "unvalidated", "reason": str(exc), "errors": []}
    manifest.build["options"] = {**options, **getattr(engine, "options", lambda: {})()}
    return run_validation(engine, model, spec, request)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
