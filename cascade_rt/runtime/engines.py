"""Engine backends: `onnxruntime`, `tensorrt`, `aoti` — stage runners over engines from `cascade_rt.export`.

The export layer builds (or loads from its cache under engines/, keyed by manifest) one engine per graph of a
`StageSpec`: the per-step denoiser (`stage_c`: x, r, cond_kv -> eps; `stage_b`: x, r, x_add, cond_kv -> eps) and
Stage A's decoder (`stage_a`: latent -> images). The step-invariant conditioning stays eager (the stage
module's `prepare_conditioning`, once per prompt) and keeps the eager layout — a list of (k, v) per attention
block, batch first, so the sampler can batch [cond; uncond]. The runner packs it into the engine's one
`cond_kv` tensor (`pack_cond_kv`) once per sampling run: the packed tensor is memoised against the identity of
the tensors it came from (held alive, so no new tensor can take their place).

Graph safety: a TensorRT engine enqueues on the current stream with the addresses it is given: capturable.
ONNX Runtime (host-side session, numpy/ORTValue I/O) and AOTInductor packages are run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cascade_rt.errors import ConfigError
from cascade_rt.runtime.backends import BuildContext, StageRunner, Tolerance, _cxx_compiler, _module_missing

logger = logging.getLogger(__name__)

SPEC_STAGE = {"c": "stage_c", "b": "stage_b", "a": "stage_a"}


class PackedCondKV:
    """cond_kv list -> the engine's packed (n_attn, 2, N, S, c) tensor, computed once per distinct list."""

    def __init__(self) -> None:
        self._source: list[Tensor] = []
        self._packed: Tensor | None = None
        self.packs = 0

    def __call__(self, cond_kv: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        from cascade_rt.export.graphs import pack_cond_kv

        leaves = [t for pair in cond_kv for t in pair]
        same = len(leaves) == len(self._source) and all(a is b for a, b in zip(leaves, self._source))
        if not same or self._packed is None:
            self._packed, self._source = pack_cond_kv(cond_kv), leaves
            self.packs += 1
        return self._packed


def engine_step(stage: str, engine: Callable[[dict[str, Tensor]], dict[str, Tensor]], dtype: torch.dtype) -> Callable:
    """The runner's per-step callable over an engine that maps {input name: tensor} -> {output name: tensor}."""
    if stage == "a":
        return lambda latent: engine({"latent": latent.to(dtype)})["images"]
    pack = PackedCondKV()

    def denoise(x: Tensor, r: Tensor, cond_kv: Sequence[tuple[Tensor, Tensor]], x_add: Tensor | None = None,
                **t_cond: Tensor) -> Tensor:  # fmt: skip
        if t_cond:
            raise ConfigError(f"engine backends do not take extra t_conds {sorted(t_cond)} (only sca/crp = 0)")
        feed = {"x": x.to(dtype), "r": r.float(), "cond_kv": pack(cond_kv)}
        if x_add is not None:
            feed["x_add"] = x_add
        return engine(feed)["eps"]

    denoise.pack = pack  # type: ignore[attr-defined]
    return denoise


class _EngineBackend:
    name = ""
    kind = ""  # the export layer's engine kind
    summary = ""
    tolerance = Tolerance(fp32=1e-3, bf16=3e-2)
    graph_safe = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        raise NotImplementedError

    def prepare(self, device: torch.device) -> None:
        pass

    def _engines_missing(self) -> str | None:
        return _module_missing("cascade_rt.export.engines", "the export layer's engines (cascade_rt.export.engines)")

    def cfg(self, stage: str) -> bool | None:
        """The CFG flag of a static engine (C and B run the [cond; uncond] batch at the official settings);
        None asks the export layer for one dynamic engine (any batch, size, CFG on or off)."""
        return stage != "a"

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        """The cached engine for this stage/weights/shapes (the export layer builds and validates it if needed)."""
        from cascade_rt.export.engines import load_engine

        engine = load_engine(
            self.kind, SPEC_STAGE[stage], model, shapes=ctx.shapes, engine_dir=ctx.engine_dir,
            model_id=ctx.model_id, device=ctx.device, cfg=self.cfg(stage),
        )  # fmt: skip
        engine.load()
        step = engine_step(stage, engine, ctx.dtype)
        return StageRunner(stage, model, backend=self.name, graph_safe=self.graph_safe, tolerance=self.tolerance,
                           step=step)  # fmt: skip


class OnnxRuntimeBackend(_EngineBackend):
    name, kind = "onnxruntime", "onnxruntime"
    summary = "ONNX export run by ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)"
    tolerance = Tolerance(fp32=1e-3, bf16=3e-2)
    graph_safe = False

    def cfg(self, stage: str) -> bool | None:
        return None  # ORT runs any shape of a dynamic graph at no cost: one graph per stage

    def unavailable_reason(self, device: torch.device) -> str | None:
        missing = _module_missing("onnxruntime", "onnxruntime")
        if missing:
            return f"{missing}; pip install onnxruntime (or onnxruntime-gpu)"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return ("this onnxruntime has no CUDAExecutionProvider, so it cannot run a CUDA stage; "
                        "pip install onnxruntime-gpu (cascade-rt[gpu]) or run the pipeline on cpu")  # fmt: skip
        return self._engines_missing()


class TensorRTBackend(_EngineBackend):
    name, kind = "tensorrt", "tensorrt"
    summary = "TensorRT engines built from the ONNX export (strongly typed, bf16/fp32)"
    tolerance = Tolerance(fp32=2e-3, bf16=5e-2)
    graph_safe = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"TensorRT needs an NVIDIA GPU (device is {device.type}); use eager, compile or onnxruntime here"
        missing = _module_missing("tensorrt", "tensorrt")
        if missing:
            return f"{missing}; pip install tensorrt (cascade-rt[tensorrt]), Linux + NVIDIA driver"
        return self._engines_missing()


class AOTIBackend(_EngineBackend):
    name, kind = "aoti", "aoti"
    summary = "AOTInductor packages (torch._inductor.aoti_compile_and_package), loaded without Python tracing"
    tolerance = Tolerance(fp32=1e-4, bf16=3e-2)
    graph_safe = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            missing = _module_missing("triton", "AOTInductor on CUDA needs triton, which")
            if missing:
                return missing
        elif _cxx_compiler() is None:
            return "AOTInductor on the CPU needs a C++ compiler (c++/g++/clang++ on PATH)"
        return self._engines_missing()


def engine_runner_info(runner: StageRunner) -> dict[str, Any]:
    """What a report says about an engine-backed runner (packs of cond_kv so far)."""
    pack = getattr(runner._step, "pack", None)
    return {"backend": runner.backend, "cond_kv_packs": pack.packs if pack is not None else None}
