"""Engine backends: `onnxruntime`, `tensorrt`, `aoti` — stage runners over engines from `cascade_rt.export`.

The export layer builds (or loads from its cache under engines/, keyed by manifest) one engine per graph of a
`StageSpec`: the per-step denoiser (`stage_c`: x, r, cond_kv -> eps; `stage_b`: x, r, x_add, cond_kv -> eps) and
Stage A's decoder (`stage_a`: latent -> images). The step-invariant conditioning stays eager (the stage
module's `prepare_conditioning`, once per prompt) and keeps the eager layout — a list of (k, v) per attention
block, batch first, so the sampler can batch [cond; uncond]. The runner packs it into the engine's one
`cond_kv` tensor (`pack_cond_kv`) in every step: a copy, but one a CUDA graph captures (a memo would hand a
captured graph stale conditioning when new values are copied into the same static buffers).

Graph safety: a TensorRT engine enqueues on the current stream with the addresses it is given: capturable.
ONNX Runtime (host-side session, numpy/ORTValue I/O) and AOTInductor packages are run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cascade_rt.errors import ConfigError
from cascade_rt.export.graph_modules import pack_cnet, pack_cond_kv
from cascade_rt.export.loader import load_engine
from cascade_rt.models.controlnet import resblock_widths
from cascade_rt.runtime.runner import BuildContext, StageRunner, Tolerance, cxx_compiler, module_missing

logger = logging.getLogger(__name__)

SPEC_STAGE = {"c": "stage_c", "b": "stage_b", "a": "stage_a"}


def engine_step(stage: str, engine: Callable[[dict[str, Tensor]], dict[str, Tensor]], dtype: torch.dtype,
                control_blocks: Sequence[int] = (), control_width: int = 0) -> Callable:
    """The runner's per-step callable over an engine that maps {input name: tensor} -> {output name: tensor}.

    cond_kv is packed on every call (one copy kernel: 44 MB for the 3.6B Stage C at batch 2, microseconds on a
    GPU): under a CUDA graph the pack is part of the captured step, so new conditioning copied into the static
    buffers is always seen. Inputs are cast to the runner's dtype (TensorRT takes no hidden casts).
    """
    if stage == "a":
        return lambda latent: engine({"latent": latent.to(dtype)})["images"]

    def denoise(x: Tensor, r: Tensor, cond_kv: Sequence[tuple[Tensor, Tensor]], x_add: Tensor | None = None,
                cnet: Sequence[Tensor | None] | None = None, **t_cond: Tensor) -> Tensor:
        if t_cond:
            raise ConfigError(f"engine backends do not take extra t_conds {sorted(t_cond)} (only sca/crp = 0)")
        feed = {"x": x.to(dtype).contiguous(), "r": r.float().contiguous(), "cond_kv": pack_cond_kv(cond_kv)}
        if x_add is not None:
            feed["x_add"] = x_add.to(dtype).contiguous()
        if control_blocks:  # the ControlNet variant: no control image = zero projections (adds nothing)
            if cnet is None:
                shape = (len(control_blocks), x.shape[0], control_width, *x.shape[-2:])
                feed["cnet"] = x.new_zeros(shape, dtype=dtype)
            else:
                feed["cnet"] = pack_cnet(cnet, control_blocks).to(dtype).contiguous()
        elif cnet is not None:
            raise ConfigError("this Stage C engine has no ControlNet input; load the pipeline with controlnet=...")
        return engine(feed)["eps"]

    return denoise


class _EngineBackend:
    name = ""
    kind = ""  # the export layer's engine kind
    summary = ""
    tolerance = Tolerance(fp32=1e-3, bf16=3e-2)
    graph_safe = False
    refit_option = False  # builds a refittable engine when the pipeline asks for one (options['refit'])

    def unavailable_reason(self, device: torch.device) -> str | None:
        raise NotImplementedError

    def prepare(self, device: torch.device) -> None:
        pass

    def cfg(self, stage: str) -> bool | None:
        """The CFG flag of a static engine (C and B run the [cond; uncond] batch at the official settings);
        None asks the export layer for one dynamic engine (any batch, size, CFG on or off)."""
        return stage != "a"

    def build(self, stage: str, model: nn.Module, ctx: BuildContext) -> StageRunner:
        """The cached engine for this stage/weights/shapes (the export layer builds and validates it if needed)."""
        control_blocks = tuple(getattr(model, "control_blocks", ())) if stage == "c" else ()
        engine = load_engine(
            self.kind, "stage_c_cnet" if control_blocks else SPEC_STAGE[stage], model, shapes=ctx.shapes,
            engine_dir=ctx.engine_dir, model_id=ctx.model_id, device=ctx.device, cfg=self.cfg(stage),
            extensions=ctx.options.get("extensions") if stage == "c" else None,
            refit=self.refit_option and stage == "c" and bool(ctx.options.get("refit")),
        )
        engine.load()
        width = resblock_widths(model)[control_blocks[0]] if control_blocks else 0
        step = engine_step(stage, engine, ctx.dtype, control_blocks, width)
        runner = StageRunner(stage, model, backend=self.name, graph_safe=self.graph_safe, tolerance=self.tolerance,
                             step=step)
        runner.engine = engine
        return runner


class OnnxRuntimeBackend(_EngineBackend):
    name, kind = "onnxruntime", "onnxruntime"
    summary = "ONNX export run by ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)"
    tolerance = Tolerance(fp32=1e-3, bf16=3e-2)
    graph_safe = False

    def cfg(self, stage: str) -> bool | None:
        return None  # ORT runs any shape of a dynamic graph at no cost: one graph per stage

    def unavailable_reason(self, device: torch.device) -> str | None:
        missing = module_missing("onnxruntime", "onnxruntime")
        if missing:
            return f"{missing}; pip install onnxruntime (or onnxruntime-gpu)"
        if device.type == "cuda":
            import onnxruntime  # optional: asked only when a CUDA stage wants it

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return ("this onnxruntime has no CUDAExecutionProvider, so it cannot run a CUDA stage; "
                        "pip install onnxruntime-gpu (cascade-rt[gpu]) or run the pipeline on cpu")
        return None


class TensorRTBackend(_EngineBackend):
    name, kind = "tensorrt", "tensorrt"
    summary = "TensorRT engines built from the ONNX export (strongly typed, bf16/fp32)"
    tolerance = Tolerance(fp32=2e-3, bf16=5e-2)
    graph_safe = True
    refit_option = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"TensorRT needs an NVIDIA GPU (device is {device.type}); use eager, compile or onnxruntime here"
        missing = module_missing("tensorrt", "tensorrt")
        if missing:
            return f"{missing}; pip install tensorrt (cascade-rt[tensorrt]), Linux + NVIDIA driver"
        return None


class AOTIBackend(_EngineBackend):
    name, kind = "aoti", "aoti"
    summary = "AOTInductor packages (torch._inductor.aoti_compile_and_package), loaded without Python tracing"
    tolerance = Tolerance(fp32=1e-4, bf16=3e-2)
    graph_safe = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            missing = module_missing("triton", "AOTInductor on CUDA needs triton, which")
            if missing:
                return missing
        elif cxx_compiler() is None:
            return "AOTInductor on the CPU needs a C++ compiler (c++/g++/clang++ on PATH)"
        return None

