"""The runtime: per-stage backends, CUDA-graphed sampling, memory modes, batching; `load_pipeline`.

    runner.py          StageRunner (what the pipeline calls), the Backend protocol, Tolerance, BuildContext
    backends.py        eager / compile / triton, the BACKENDS registry, parse_backend_spec, available_backends
    engine_backends.py onnxruntime / tensorrt / aoti runners over cascade_rt.export engines
    cuda_graphs.py     GraphKey, StaticStep, GraphedSampler (CUDA graphs of the whole denoising step)
    memory.py          resident / sequential / offload placement, per-stage peaks
    estimate.py        device-memory estimates on the meta device (the `edge` preset's 8 GB budget)
    throughput.py      batched requests, Stage B/A of one batch overlapped with Stage C of the next
    api.py             load_pipeline -> RuntimePipeline

Importing this package imports torch and nothing else heavy; the pipeline-level names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from cascade_rt.runtime.backends import (
    BACKENDS,
    BackendStatus,
    available_backends,
    build_runner,
    default_backends,
    format_backend_spec,
    get_backend,
    parse_backend_spec,
    require_backend,
)
from cascade_rt.runtime.cuda_graphs import GraphedSampler, GraphKey, StaticStep
from cascade_rt.runtime.memory import MEMORY_MODES, BlockOffloader, MemoryManager, offload_units
from cascade_rt.runtime.runner import Backend, BuildContext, StageRunner, Tolerance, relative_error
from cascade_rt.stages import STAGES

_LAZY = {
    "load_pipeline": "cascade_rt.runtime.api",
    "RuntimePipeline": "cascade_rt.runtime.api",
    "RuntimeOutput": "cascade_rt.runtime.api",
    "estimate_memory": "cascade_rt.runtime.estimate",
    "MemoryEstimate": "cascade_rt.runtime.estimate",
    "ThroughputRunner": "cascade_rt.runtime.throughput",
    "make_batches": "cascade_rt.runtime.throughput",
}

__all__ = [
    "BACKENDS", "MEMORY_MODES", "STAGES", "Backend", "BackendStatus", "BlockOffloader", "BuildContext",
    "GraphKey", "GraphedSampler", "MemoryManager", "StageRunner", "StaticStep", "Tolerance",
    "available_backends", "build_runner", "default_backends", "format_backend_spec", "get_backend",
    "offload_units", "parse_backend_spec", "relative_error", "require_backend", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cascade_rt.runtime' has no attribute {name!r}")
