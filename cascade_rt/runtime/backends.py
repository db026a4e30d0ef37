"""Backends: how a stage's eager model becomes the stage runner the pipeline calls (`runner.py`).

Backends live in one explicit dict (`BACKENDS`), are chosen per stage (`parse_backend_spec("c=tensorrt,b=triton,
a=eager")`) and are never named by the pipeline: what differs between backends is only which callables sit inside
the runner. A backend that cannot run here raises `BackendUnavailable` with the reason when asked for;
`available_backends()` lists every reason. Here: eager, compile, triton and the registry; the engine backends
(onnxruntime, tensorrt, aoti) adapt `cascade_rt.export` in `engine_backends.py`. Each backend documents its
tolerance against eager (`Tolerance`, docs/runtime.md).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cascade_rt.errors import BackendUnavailable, ConfigError
from cascade_rt.runtime.engine_backends import AOTIBackend, OnnxRuntimeBackend, TensorRTBackend
from cascade_rt.runtime.runner import (
    Backend,
    BuildContext,
    StageRunner,
    Tolerance,
    cxx_compiler,
    eager_step,
    module_missing,
)
from cascade_rt.stages import STAGE_ALIASES, STAGES

logger = logging.getLogger(__name__)



class EagerBackend:
    name = "eager"
    summary = "the plain PyTorch modules (the reference every other backend is compared with)"
    tolerance = Tolerance(fp32=0.0, bf16=0.0)
    graph_safe = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def prepare(self, device: torch.device) -> None:
        pass

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        return StageRunner(
            stage, model, backend=self.name, graph_safe=True, tolerance=self.tolerance, step=eager_step(stage, model)
        )


class CompileBackend:
    """torch.compile of the per-step call (`denoise` / `decode`); the conditioning stays eager.

    mode=None (default) on purpose: "reduce-overhead" brings its own CUDA graphs, which would fight ours.
    Compilation happens on the first call(s), i.e. in the CUDA-graph warm-up, never inside a capture.
    """

    name = "compile"
    summary = "torch.compile (Inductor) of each stage's per-step call"
    tolerance = Tolerance(fp32=1e-4, bf16=3e-2)
    graph_safe = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            return module_missing("triton", "Inductor on CUDA needs triton, which")
        if cxx_compiler() is None:
            return "Inductor on the CPU needs a C++ compiler (c++/g++/clang++ on PATH); install one or use eager"
        return None

    def prepare(self, device: torch.device) -> None:
        pass

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        step = torch.compile(eager_step(stage, model), dynamic=False, mode=ctx.compile_mode)
        return StageRunner(stage, model, backend=self.name, graph_safe=True, tolerance=self.tolerance, step=step)


class TritonBackend:
    """cascade_rt.kernels: the model's blocks swapped for fused Triton kernels (`apply_triton_kernels`).

    On a CPU the kernels run only through Triton's interpreter: correct, slow, meant for tests and the tiny
    preset. `triton.jit` fixes compiled vs interpreted when triton is first imported, so `prepare` (called by
    `build_runner` and `load_pipeline` before anything is built or exported) sets TRITON_INTERPRET=1 on a CPU
    if triton has not been imported yet; otherwise it must have been exported before Python started.
    """

    name = "triton"
    summary = "fused Triton kernels (cascade_rt.kernels) swapped into the eager modules"
    tolerance = Tolerance(fp32=2e-4, bf16=3e-2)
    graph_safe = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        missing = module_missing("triton", "triton")
        if missing:
            return f"{missing}; pip install triton (Linux + CUDA GPU)"
        if device.type != "cuda" and not _interpreting() and "triton" in sys.modules:
            return (
                f"Triton kernels need a CUDA GPU (device is {device.type}); on a CPU they run through the "
                "interpreter, which must be chosen before triton is imported: export TRITON_INTERPRET=1 before "
                "starting Python (slow; tests and tiny presets)"
            )
        return module_missing("cascade_rt.kernels.backend", "the Triton kernel backend (cascade_rt.kernels.backend)")

    def prepare(self, device: torch.device) -> None:
        if device.type != "cuda" and not _interpreting() and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
            logger.info("triton backend on %s: Triton's interpreter (TRITON_INTERPRET=1), slow", device.type)

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        # imported here, after prepare(): importing triton fixes compiled vs interpreted for the process
        from cascade_rt.kernels.backend import apply_triton_kernels

        swapped = apply_triton_kernels(model)
        model = swapped if isinstance(swapped, nn.Module) else model
        return StageRunner(
            stage, model, backend=self.name, graph_safe=True, tolerance=self.tolerance, step=eager_step(stage, model)
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_backends() -> dict[str, Backend]:
    """A fresh registry: name -> backend. Nothing is imported or probed until a backend is used."""
    backends: list[Backend] = [
        EagerBackend(), CompileBackend(), TritonBackend(), OnnxRuntimeBackend(), TensorRTBackend(), AOTIBackend()
    ]
    return {b.name: b for b in backends}


BACKENDS: dict[str, Backend] = default_backends()


def get_backend(name: str, registry: Mapping[str, Backend] | None = None) -> Backend:
    registry = BACKENDS if registry is None else registry
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(registry)}") from None


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str | None
    graph_safe: bool
    tolerance: Tolerance
    summary: str


def available_backends(
    device: str | torch.device | None = None, registry: Mapping[str, Backend] | None = None
) -> dict[str, BackendStatus]:
    """Every registered backend with whether it can run on `device` here, and if not, why."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {}
    for name, backend in (BACKENDS if registry is None else registry).items():
        reason = backend.unavailable_reason(device)
        out[name] = BackendStatus(name, reason is None, reason, backend.graph_safe, backend.tolerance, backend.summary)
    return out


def require_backend(name: str, device: torch.device, registry: Mapping[str, Backend] | None = None) -> Backend:
    backend = get_backend(name, registry)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device}: {reason}")
    return backend


def parse_backend_spec(
    spec: str | Mapping[str, str] | None, registry: Mapping[str, Backend] | None = None
) -> dict[str, str]:
    """'eager' | 'c=tensorrt,b=triton,a=eager' | 'triton,a=eager' (a bare name = default) | dict -> {stage: name}.

    Stages not named get the bare default, else eager. Names are checked against the registry; availability
    is checked later, when a stage is built on its device.
    """
    registry = BACKENDS if registry is None else registry
    if spec is None:
        spec = "eager"
    items: list[tuple[str | None, str]] = []
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if not spec.strip() or any(not p for p in parts):
            raise ConfigError(f"empty backend spec item in {spec!r}; use e.g. 'eager' or 'c=tensorrt,b=triton,a=eager'")
        for part in parts:
            if "=" in part:
                stage, _, name = (s.strip() for s in part.partition("="))
                items.append((stage, name))
            else:
                items.append((None, part))
    else:
        raise ConfigError(f"backend must be a string or a {{stage: name}} dict, got {type(spec).__name__}")

    default, chosen = "eager", {}
    defaults = [name for stage, name in items if stage is None]
    if len(defaults) > 1:
        raise ConfigError(f"backend spec {spec!r} names more than one default backend: {defaults}")
    for stage, name in items:
        get_backend(name, registry)  # raises ConfigError listing the known names
        if stage is None:
            default = name
            continue
        key = STAGE_ALIASES.get(stage.lower())
        if key is None:
            raise ConfigError(f"unknown stage {stage!r} in backend spec {spec!r}; stages are c, b, a")
        if key in chosen:
            raise ConfigError(f"stage {key!r} is given twice in backend spec {spec!r}")
        chosen[key] = name
    return {stage: chosen.get(stage, default) for stage in STAGES}


def format_backend_spec(per_stage: Mapping[str, str]) -> str:
    return ",".join(f"{s}={per_stage[s]}" for s in STAGES if s in per_stage)


def build_runner(
    stage: str, model: nn.Module, backend: str, ctx: BuildContext, registry: Mapping[str, Backend] | None = None
) -> StageRunner:
    """Check that `backend` can run on ctx.device, then build the stage runner (BackendUnavailable otherwise)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    chosen = require_backend(backend, ctx.device, registry)
    getattr(chosen, "prepare", lambda device: None)(ctx.device)
    runner = chosen.build(stage, model, ctx)
    logger.debug("stage %s: %r", stage, runner)
    return runner
