"""What every backend builds and what the pipeline calls: `StageRunner`, and the `Backend` protocol.

A *stage runner* has the small interface the pipeline uses and nothing else:

* Stage C / B (denoisers): `prepare_conditioning(...)` once per prompt (step-invariant, eager by default) and
  `denoise(x, r, **cond)` once per step (the part a backend accelerates);
* Stage A (decoder): `decode(latent)`.

A *backend* turns `(stage, eager model)` into a runner (`Backend.build`); each documents its agreement with eager
as a `Tolerance` (`relative_error`). The backends themselves live in `backends.py` (eager, compile, triton and the
registry) and `engine_backends.py` (onnxruntime, tensorrt, aoti over `cascade_rt.export`).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cascade_rt.stages import DENOISERS


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
        self.engine: Any = None  # engine backends: the loaded engine `step` runs (a LoRA switch refits it)

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


def eager_step(stage: str, model: nn.Module) -> Callable[..., Tensor]:
    """The eager module's per-step call: `decode` for Stage A, `denoise` for Stage C/B."""
    return model.decode if stage == "a" else model.denoise


def module_missing(module: str, what: str) -> str | None:
    """None when `module` is installed, else why not; found without importing it (importing triton would fix
    its interpreter mode)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception as exc:  # a broken parent package: report, don't crash `available_backends()`
        return f"{what} cannot be found ({type(exc).__name__}: {exc})"
    return None if found else f"{what} is not installed"


def cxx_compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
