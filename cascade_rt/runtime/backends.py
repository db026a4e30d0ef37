"""Backends: how a stage's eager model becomes the stage runner the pipeline calls.

A *stage runner* has the small interface the pipeline uses and nothing else:

* Stage C / B (denoisers): `prepare_conditioning(...)` once per prompt (step-invariant, eager by default) and
  `denoise(x, r, **cond)` once per step (the part a backend accelerates);
* Stage A (decoder): `decode(latent)`.

A *backend* turns `(stage, eager model)` into a runner. Backends live in one explicit dict (`BACKENDS`), are
chosen per stage (`parse_backend_spec("c=tensorrt,b=triton,a=eager")`) and are never named by the pipeline:
what differs between backends is only which callables sit inside the runner. A backend that cannot run here
raises `BackendUnavailable` with the reason when asked for; `available_backends()` lists every reason.

Engine backends (onnxruntime, tensorrt, aoti) adapt `cascade_rt.export` and live in `runtime/engines.py`.
Each backend documents its tolerance against eager (see `Tolerance` and docs/runtime.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cascade_rt.errors import BackendUnavailable, ConfigError
from cascade_rt.stages import DENOISERS, STAGE_ALIASES, STAGES

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Tolerance:
    """Documented agreement of one stage call with eager in the same dtype: max|y - y_eager| / max|y_eager|."""

    fp32: float
    bf16: float

    def for_dtype(self, dtype: torch.dtype) -> float:
        return self.fp32 if dtype == torch.float32 else self.bf16


def relative_error(y: Tensor, ref: Tensor) -> float:
    """max|y - ref| / max|ref| in fp32 (the metric every `Tolerance` is stated in)."""
    y, ref = y.detach().float().cpu(), ref.detach().float().cpu()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@dataclass
class BuildContext:
    """What a backend may need beyond the model. Eager-style backends ignore most of it.

    `shapes` are the (batch, height, width) image sizes to build engines for (one: a static engine where the
    backend wants one; several: a dynamic engine, the first is its optimisation point); `engine_dir` is the
    engine cache; `model_id` says where the weights came from (recorded in engine manifests).
    """

    device: torch.device
    dtype: torch.dtype
    shapes: tuple[tuple[int, int, int], ...] = ((1, 1024, 1024),)
    engine_dir: Path = Path("engines")
    model_id: str | None = None
    compile_mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


class StageRunner:
    """What the pipeline calls for one stage. Backends differ only in the callables they put here.

    `model` is the stage's eager module: it computes the step-invariant conditioning (unless the backend gives
    its own `conditioning`) and holds the weights the memory modes move. `graph_safe` says whether the per-step
    call may be captured in a CUDA graph (fixed addresses, no host sync, no host-side work per call).
    """

    def __init__(
        self,
        stage: str,
        model: nn.Module,
        *,
        backend: str,
        graph_safe: bool,
        tolerance: Tolerance,
        step: Callable[..., Tensor],
        conditioning: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        self.stage, self.model, self.backend = stage, model, backend
        self.graph_safe, self.tolerance = graph_safe, tolerance
        self._step, self._conditioning = step, conditioning

    def prepare_conditioning(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._need(DENOISERS, "prepare_conditioning")
        if self._conditioning is not None:
            return self._conditioning(*args, **kwargs)
        return self.model.prepare_conditioning(*args, **kwargs)

    def denoise(self, x: Tensor, r: Tensor, **cond: Any) -> Tensor:
        self._need(DENOISERS, "denoise")
        return self._step(x, r, **cond)

    def decode(self, latent: Tensor) -> Tensor:
        self._need(("a",), "decode")
        return self._step(latent)

    def _need(self, stages: tuple[str, ...], what: str) -> None:
        if self.stage not in stages:
            raise TypeError(f"stage {self.stage!r} runner has no {what}() (stages with it: {', '.join(stages)})")

    def __repr__(self) -> str:
        return f"StageRunner(stage={self.stage!r}, backend={self.backend!r}, graph_safe={self.graph_safe})"


class Backend(Protocol):
    name: str
    summary: str
    tolerance: Tolerance
    graph_safe: bool

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can run on `device` here, else a sentence saying why not and what to do."""

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        """The runner for `stage`. May modify `model` in place (module swaps), never its weights' values."""

    def prepare(self, device: torch.device) -> None:
        """Process-level setup before any model is built or exported (most backends: nothing)."""


def _eager_step(stage: str, model: nn.Module) -> Callable[..., Tensor]:
    return model.decode if stage == "a" else model.denoise


def _module_missing(module: str, what: str) -> str | None:
    """Whether `module` is installed, found without importing it (importing triton would fix its mode)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception as exc:  # a broken parent package: report, don't crash `available_backends()`
        return f"{what} cannot be found ({type(exc).__name__}: {exc})"
    return None if found else f"{what} is not installed"


def _cxx_compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


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
            stage, model, backend=self.name, graph_safe=True, tolerance=self.tolerance, step=_eager_step(stage, model)
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
            return _module_missing("triton", "Inductor on CUDA needs triton, which")
        if _cxx_compiler() is None:
            return "Inductor on the CPU needs a C++ compiler (c++/g++/clang++ on PATH); install one or use eager"
        return None

    def prepare(self, device: torch.device) -> None:
        pass

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        step = torch.compile(_eager_step(stage, model), dynamic=False, mode=ctx.compile_mode)
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
        missing = _module_missing("triton", "triton")
        if missing:
            return f"{missing}; pip install triton (Linux + CUDA GPU)"
        if device.type != "cuda" and not _interpreting() and "triton" in sys.modules:
            return (
                f"Triton kernels need a CUDA GPU (device is {device.type}); on a CPU they run through the "
                "interpreter, which must be chosen before triton is imported: export TRITON_INTERPRET=1 before "
                "starting Python (slow; tests and tiny presets)"
            )
        return _module_missing("cascade_rt.kernels.backend", "the Triton kernel backend (cascade_rt.kernels.backend)")

    def prepare(self, device: torch.device) -> None:
        if device.type != "cuda" and not _interpreting() and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
            logger.info("triton backend on %s: Triton's interpreter (TRITON_INTERPRET=1), slow", device.type)

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        from cascade_rt.kernels.backend import apply_triton_kernels

        swapped = apply_triton_kernels(model)
        model = swapped if isinstance(swapped, nn.Module) else model
        return StageRunner(
            stage, model, backend=self.name, graph_safe=True, tolerance=self.tolerance, step=_eager_step(stage, model)
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _engine_backends() -> list[Backend]:
    from cascade_rt.runtime.engines import AOTIBackend, OnnxRuntimeBackend, TensorRTBackend

    return [OnnxRuntimeBackend(), TensorRTBackend(), AOTIBackend()]


def default_backends() -> dict[str, Backend]:
    """A fresh registry: name -> backend. Nothing is imported or probed until a backend is used."""
    backends: list[Backend] = [EagerBackend(), CompileBackend(), TritonBackend(), *_engine_backends()]
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


def parse_backend_spec(spec: str | Mapping[str, str] | None, registry: Mapping[str, Backend] | None = None) -> dict[str, str]:
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
