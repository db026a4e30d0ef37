"""TensorRT engines: build a strongly typed plan from a stage's ONNX graph, and run it with torch tensors.

Written against the TensorRT 10.x Python API. `tensorrt` is imported lazily, only here; without it every entry
point raises `BackendUnavailable` (tests skip with that reason). Everything before the builder, the ONNX rewrite
(`onnx_passes.prepare_for_tensorrt`) and the optimisation profiles (`build_settings`), needs no TensorRT.

Lifecycle: build -> load (deserialise; weight-streaming budget) -> activate (execution context, optionally on
caller-owned device memory shared between engines) -> allocate (input shapes + output buffers for one shape) ->
infer (bind input addresses, `execute_async_v3` on the caller's stream). After `allocate`, `infer` neither
allocates nor synchronises, so it can be captured in a CUDA graph (run it once before capturing).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from cascade_rt.errors import BackendUnavailable, EngineError
from cascade_rt.export.engine import check_inputs, named_inputs
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.onnx_export import heartbeat
from cascade_rt.export.onnx_passes import prepare_for_tensorrt
from cascade_rt.export.specs import Dims, StageSpec

logger = logging.getLogger(__name__)

UNAVAILABLE = (
    "tensorrt is not installed: pip install tensorrt (or cascade-rt[tensorrt]) on Linux with an NVIDIA GPU and "
    "driver; NVIDIA's wheels come from pypi.nvidia.com (pip --extra-index-url https://pypi.nvidia.com)"
)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(UNAVAILABLE) from exc
    return trt


def build_settings(spec: StageSpec, dims: Dims, dynamic: bool, **options: Any) -> dict[str, Any]:
    """Everything a build uses besides the graph: one optimisation profile from the spec, builder options."""
    return {
        "profile": {k: [list(s) for s in v] for k, v in spec.profile(dims, dynamic).items()},
        "builder_optimization_level": int(options.get("builder_optimization_level", 3)),
        "weight_streaming": bool(options.get("weight_streaming", False)),
        "workspace_bytes": options.get("workspace_bytes"),
        "strongly_typed": True,
        "refit": bool(options.get("refit", False)),
    }


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    settings: dict[str, Any],
    *,
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Parse the (rewritten) graph into a strongly typed network and serialise a plan to `plan_path`."""
    graph, rewrites = prepare_for_tensorrt(onnx_path)
    trt = import_tensorrt()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(graph)):  # from the file, so external data next to it is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {graph}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = settings["builder_optimization_level"]
    if settings.get("workspace_bytes"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_bytes"]))
    if settings["weight_streaming"]:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if settings.get("refit"):  # weights may be replaced after the build (LoRA switch: refit_weights)
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in settings["profile"].items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    with heartbeat(f"TensorRT building {Path(plan_path).name}"):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build an engine from {graph} (see the TensorRT log above)")
    seconds = time.perf_counter() - start
    with open(plan_path, "wb") as f:
        f.write(plan)
        f.flush()
        os.fsync(f.fileno())
    if cache_path:
        tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp, cache_path)
    logger.info("TensorRT built %s in %.1f s", Path(plan_path).name, seconds)
    return {"seconds": seconds, "rewrites": rewrites, "tensorrt": trt.__version__}


def refit_weights(engine: "TrtEngine", weights: Mapping[str, Tensor]) -> None:
    """Replace named weights (ONNX initializer names, which the ONNX parser keeps) of a loaded engine built with
    REFIT, in place (`trt.Refitter`); the plan file on disk is unchanged. Values must already have the
    initializer's layout and dtype (export/refit.py makes them)."""
    trt = import_tensorrt()
    engine.load()
    if not engine.engine.refittable:
        raise EngineError(
            f"{engine.path.name} was built without TensorRT's REFIT flag, so its weights cannot be replaced; build a "
            "refittable engine (load_pipeline(..., refittable=True) or `cascade-rt export --refit`) or load the "
            "pipeline again with the new --lora"
        )
    log = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine.engine, log)
    kept = []  # device copies must live until refit_cuda_engine returns
    for name, value in weights.items():
        t = value.detach().to("cuda").contiguous()
        kept.append(t)
        w = trt.Weights(_trt_dtype(trt, t.dtype), t.data_ptr(), t.numel())
        if not refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE):
            raise EngineError(f"{engine.path.name}: TensorRT has no refittable weights named {name!r} (the plan is "
                              "stale or the builder folded them); rebuild the engine")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise EngineError(f"{engine.path.name}: TensorRT needs these weights too before a refit (combined with the "
                          f"ones given): {missing[:5]}; rebuild the engine for the new LoRA instead")
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT could not refit {engine.path.name} (see the TensorRT log above)")
    torch.cuda.synchronize()


def _trt_dtype(trt, dtype: torch.dtype):
    table = {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16}
    return table[dtype]


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
    }
    return table[dtype]


class TrtEngine:
    format = "tensorrt"

    def __init__(
        self,
        path: str | Path,
        spec: StageSpec,
        precision: str,
        *,
        manifest: Manifest | None = None,
        weight_streaming_budget: int | None = None,
    ) -> None:
        self.path, self.spec, self.precision, self.manifest = Path(path), spec, precision, manifest
        self.weight_streaming_budget = weight_streaming_budget
        self.engine = self.context = None
        self.outputs: dict[str, torch.Tensor] = {}
        self._shape_key: tuple | None = None
        self._bound: dict[str, int] = {}

    # ---- load: deserialise
    def load(self) -> None:
        if self.engine is not None:
            return
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT engines need a CUDA GPU")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialise {self.path} (built by another TensorRT or GPU?)")
        if self.weight_streaming_budget is not None:
            self.engine.weight_streaming_budget_v2 = int(self.weight_streaming_budget)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        want = self.spec.input_names + self.spec.output_names
        if sorted(names) != sorted(want):
            raise EngineError(f"{self.path}: engine tensors {names} differ from the spec {want}")
        dtypes = self.spec.dtypes(self.precision)
        for n in names:
            if _torch_dtype(trt, self.engine.get_tensor_dtype(n)) != dtypes[n]:
                got = self.engine.get_tensor_dtype(n)
                raise EngineError(f"{self.path}: tensor {n} is {got}, the spec says {dtypes[n]}")

    @property
    def device_memory_bytes(self) -> int:
        self.load()
        return int(self.engine.device_memory_size_v2)

    # ---- activate: execution context (on shared memory when given)
    def activate(self, device_memory: torch.Tensor | None = None) -> None:
        self.load()
        trt = import_tensorrt()
        if device_memory is None:
            self.context = self.engine.create_execution_context()
        else:
            if device_memory.numel() * device_memory.element_size() < self.device_memory_bytes:
                raise EngineError(f"shared device memory is smaller than the {self.device_memory_bytes} bytes needed")
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.context = self.engine.create_execution_context(strategy)
            self.context.set_device_memory(device_memory.data_ptr(), self.device_memory_bytes)
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.path}")
        self._shape_key = None

    # ---- allocate: shapes + output buffers for one input shape set
    def allocate(self, values: dict[str, int]) -> dict[str, torch.Tensor]:
        if self.context is None:
            self.activate()
        shapes = self.spec.shapes(values)
        for name in self.spec.input_names:
            self.context.set_input_shape(name, shapes[name])
        dtypes = self.spec.dtypes(self.precision)
        self.outputs = {
            n: torch.empty(shapes[n], dtype=dtypes[n], device="cuda") for n in self.spec.output_names
        }
        for name, t in self.outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self._shape_key = tuple(sorted(values.items()))
        self._bound = {}
        return self.outputs

    # ---- infer: no allocation, no sync
    def infer(self, inputs: Mapping[str, Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, Tensor]:
        for name in self.spec.input_names:
            ptr = inputs[name].data_ptr()
            if self._bound.get(name) != ptr:
                self.context.set_tensor_address(name, ptr)
                self._bound[name] = ptr
        stream = stream or torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT execution of {self.path.name} failed")
        return self.outputs

    def __call__(self, feed: Mapping[str, Tensor] | None = None, /, **kw: Tensor) -> dict[str, Tensor]:
        """Inputs must already have the engine's dtypes (no hidden casts: buffers must not move under a graph).
        Returns the engine's own output buffers, overwritten by the next call."""
        self.load()
        inputs = named_inputs(feed, kw)
        values = check_inputs(self.spec, self.precision, inputs, self.manifest)
        if any(not t.is_cuda or not t.is_contiguous() for t in inputs.values()):
            raise EngineError("TensorRT inputs must be contiguous CUDA tensors")
        if self._shape_key != tuple(sorted(values.items())):
            self.allocate(values)
        return self.infer(inputs)
