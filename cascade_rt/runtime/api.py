"""`load_pipeline(...)`: the eager pipeline with backend runners, CUDA-graphed samplers and a memory mode.

    pipe = cascade_rt.load_pipeline(random_weights=True, preset="tiny", backend="c=onnxruntime,b=triton,a=eager")
    out = pipe("a cat", height=256, width=256, seed=0)      # out.images, out.timings, out.peak_memory

`RuntimePipeline` *is* the reference `StableCascadePipeline` (same code path, same randomness); only the
objects it holds differ: each stage is a backend's `StageRunner` (behind a memory-mode proxy), and its per-stage
samplers are `GraphedSampler.sample_stage` when CUDA graphs are on. The pipeline never learns which backend
runs a stage. CUDA graphs need a CUDA device, the resident memory mode (weights that move would invalidate the
graphs) and a graph-safe runner (not onnxruntime / aoti); otherwise that stage samples eagerly, said once in
the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cascade_rt.errors import ConfigError
from cascade_rt.extensions import attach_extensions
from cascade_rt.pipeline import CascadeOutput, StableCascadePipeline, build_random_pipeline
from cascade_rt.runtime.backends import build_runner, get_backend, parse_backend_spec, require_backend
from cascade_rt.runtime.budget import check_batch_memory
from cascade_rt.runtime.cuda_graphs import GraphedSampler
from cascade_rt.runtime.memory import MemoryManager
from cascade_rt.runtime.runner import BuildContext, StageRunner
from cascade_rt.stages import STAGES, runtime_preset
from cascade_rt.validation import check_engine_dir, resolve_device

logger = logging.getLogger(__name__)

MANAGED_METHODS = ("encode", "prepare_conditioning", "denoise", "decode", "__call__")


class Managed:
    """Proxy that puts a component's weights in place (memory mode) before any of its work methods runs."""

    def __init__(self, name: str, target: Any, memory: MemoryManager) -> None:
        self._name, self._target, self._memory = name, target, memory

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if attr in MANAGED_METHODS and callable(value):
            def managed(*args: Any, **kwargs: Any) -> Any:
                self._memory.enter(self._name)
                return value(*args, **kwargs)

            return managed
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._memory.enter(self._name)
        return self._target(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Managed({self._name!r}, {self._target!r})"


@dataclass
class RuntimeOutput(CascadeOutput):
    peak_memory: dict[str, int | None] = field(default_factory=dict)  # bytes per component (CUDA), None on CPU
    backends: dict[str, str] = field(default_factory=dict)
    graphs: dict[str, dict[str, int]] = field(default_factory=dict)  # per stage: replays, captures, fallbacks


class RuntimePipeline(StableCascadePipeline):
    """The reference pipeline running on per-stage backend runners (see module docstring)."""

    def __init__(
        self,
        *,
        runners: Mapping[str, StageRunner],
        memory: MemoryManager,
        samplers: Mapping[str, GraphedSampler],
        device: torch.device,
        components: Mapping[str, Any],
        mode: str = "official",
    ) -> None:
        managed = {name: Managed(name, obj, memory) if obj is not None else None for name, obj in components.items()}
        super().__init__(
            text_encoder=managed["text"], image_encoder=managed.get("image"), effnet=managed.get("effnet"),
            previewer=managed.get("previewer"), mode=mode,
            **{f"stage_{s}": Managed(s, runners[s], memory) for s in STAGES},
        )
        self.device = device  # in sequential/offload modes the weights may sit on the CPU right now
        self.runners, self.memory, self.graphed = dict(runners), memory, dict(samplers)
        for stage, sampler in self.graphed.items():  # the pipeline's per-stage sampler hook
            self.samplers[stage] = sampler.sample_stage

    @property
    def backends(self) -> dict[str, str]:
        return {s: r.backend for s, r in self.runners.items()}

    def __call__(self, *args: Any, **kwargs: Any) -> RuntimeOutput:
        self.memory.peaks.clear()  # this call's peaks
        return self._report(super().__call__(*args, **kwargs))

    def reconstruct(self, *args: Any, **kwargs: Any) -> RuntimeOutput:
        self.memory.peaks.clear()
        return self._report(super().reconstruct(*args, **kwargs))

    def check_batch_memory(self, batch: int, height: int, width: int, prompts: int = 1) -> None:
        """Refuse a batch whose estimated memory exceeds this device's (budget.py); skipped for models of no
        known preset (the estimate builds presets on the meta device)."""
        presets = {s: getattr(r.model, "preset", None) for s, r in self.runners.items()}
        presets["text"] = getattr(self.text_encoder, "preset", None)
        if all(isinstance(p, str) for p in presets.values()):
            check_batch_memory(
                presets, batch=batch, height=height, width=width, dtype=self.dtypes["c"], mode=self.memory.mode,
                device=self.device, weights_loaded=True, prompts=prompts,
            )

    def _report(self, out: CascadeOutput) -> RuntimeOutput:
        self.memory.finish()
        fields = {k: getattr(out, k) for k in CascadeOutput.__dataclass_fields__}
        graphs = {s: dict(g.stats) for s, g in self.graphed.items()}
        return RuntimeOutput(**fields, peak_memory=dict(self.memory.peaks), backends=self.backends, graphs=graphs)

    def warmup(self, shapes: Sequence[tuple[int, int, int]], **kwargs: Any) -> None:
        """Run one generation per (batch, height, width), largest first (graphs share one pool), e.g. to capture
        CUDA graphs before serving; then `freeze_graphs()` makes any other shape run eagerly with one warning."""
        for batch, height, width in sorted(shapes, key=lambda s: s[0] * s[1] * s[2], reverse=True):
            self(["warmup"] * batch, height=height, width=width, seed=0, **kwargs)

    def freeze_graphs(self) -> None:
        for sampler in self.graphed.values():
            sampler.freeze()


def _device(device: str | torch.device | None) -> torch.device:
    return resolve_device(device)  # cpu, cuda or cuda:N that exists here (cascade_rt.validation)


def load_pipeline(
    weights: str | Path | None = None,
    *,
    preset: str = "full",
    random_weights: bool = False,
    backend: str | Mapping[str, str] = "eager",
    cuda_graphs: bool = True,
    memory: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    text_encoder: str | None = None,
    whole_loop_graphs: bool = False,
    graph_debug: bool = False,
    engine_dir: str | Path = "engines",
    engine_shapes: Sequence[tuple[int, int, int]] = ((1, 1024, 1024),),
    seed: int = 0,
    lora: Sequence[Any] = (),
    controlnet: str | None = None,
    controlnet_weights: str | Path | None = None,
    saliency_model: str | Path | None = None,
    refittable: bool = False,
) -> RuntimePipeline:
    """A ready pipeline. weights: a folder (official or diffusers layout) or None with random_weights=True
    (seeded, untrained: for tests and speed). preset: tiny | lite | full | edge (lite models, sequential memory).
    backend: one name for all stages or 'c=...,b=...,a=...'. memory: resident | sequential | offload
    (default: the preset's). engine_shapes: (batch, height, width) the engine backends build profiles for.
    lora: LoRA files ('file.safetensors' or 'file.safetensors:0.8'), merged into Stage C before any backend is
    built; controlnet: 'canny' | 'inpainting' | 'sr' with its checkpoint (controlnet_weights, or the official file
    name in the weights folder; random with random_weights). refittable: build Stage C's TensorRT engine with
    REFIT, so `switch_loras` can replace its LoRA weights (onnxruntime and aoti need nothing). See docs/extensions.md.
    """
    chosen = runtime_preset(preset)
    models = chosen.size
    memory = memory or chosen.memory
    device = _device(device)
    per_stage = parse_backend_spec(backend)
    if any(getattr(get_backend(name), "kind", "") for name in per_stage.values()):  # an engine backend
        check_engine_dir(engine_dir, "engine_dir")
    for name in dict.fromkeys(per_stage.values()):  # fail before building gigabytes of models
        backend_obj = require_backend(name, device)
        backend_obj.prepare(device)  # process-level setup (the Triton interpreter on a CPU) before any build
    build_device = device if memory == "resident" else torch.device("cpu")
    if random_weights:
        if weights is not None:
            raise ConfigError("give either weights=DIR or random_weights=True, not both")
        eager = build_random_pipeline(models, dtype=dtype, device=build_device, seed=seed)
        model_id = f"random:{models}:seed={seed}"
    elif weights is not None:
        if models == "tiny":
            raise ConfigError("preset 'tiny' exists only with random_weights=True; use lite, full or edge")
        eager = StableCascadePipeline.from_pretrained(
            str(weights), lite=models == "lite", dtype=dtype, device=build_device, text_encoder=text_encoder
        )
        model_id = str(weights)
    else:
        raise ConfigError("give weights=DIR (a folder with the Stable Cascade checkpoints) or random_weights=True")

    extensions = attach_extensions(
        eager, lora=lora, controlnet=controlnet, controlnet_weights=controlnet_weights,
        weights_dir=weights, saliency_model=saliency_model, random_weights=random_weights, seed=seed,
    )
    ctx = BuildContext(
        device=device, dtype=dtype, shapes=tuple(engine_shapes), engine_dir=Path(engine_dir), model_id=model_id,
        options={"extensions": extensions.describe() if extensions else {}, "refit": refittable},
    )
    runners = {s: build_runner(s, getattr(eager, f"stage_{s}"), per_stage[s], ctx) for s in STAGES}
    components = {"text": eager.text_encoder, "image": eager.image_encoder, "effnet": eager.effnet,
                  "previewer": eager.previewer}
    modules = {name: obj for name, obj in components.items() if isinstance(obj, torch.nn.Module)}
    modules.update({s: runners[s].model for s in STAGES})
    manager = MemoryManager(memory, device, modules)
    samplers = _graphed_samplers(runners, manager, device, cuda_graphs, whole_loop_graphs, graph_debug)
    pipe = RuntimePipeline(runners=runners, memory=manager, samplers=samplers, device=device,
                           components=components, mode=eager.mode)
    pipe.extensions = extensions
    logger.info("pipeline: %s, backends %s, memory %s, CUDA graphs on %s", models, pipe.backends, memory,
                sorted(samplers) or "no stage")
    return pipe


def _graphed_samplers(
    runners: Mapping[str, StageRunner], memory: MemoryManager, device: torch.device, enabled: bool,
    whole_loop: bool, debug: bool,
) -> dict[str, GraphedSampler]:
    if not enabled:
        return {}
    if device.type != "cuda":
        logger.info("CUDA graphs: off (device is %s)", device)
        return {}
    if memory.moves_weights:
        logger.info("CUDA graphs: off in memory mode %r (weights move between calls)", memory.mode)
        return {}
    pool = torch.cuda.graph_pool_handle()  # one pool for all stages: they never replay concurrently
    samplers = {}
    for stage in ("c", "b"):
        runner = runners[stage]
        if not runner.graph_safe:
            logger.info("CUDA graphs: off for stage %s (backend %s is not graph-safe)", stage, runner.backend)
            continue
        module = runner.model
        samplers[stage] = GraphedSampler(
            stage, mode="graph", pool=pool, whole_loop=whole_loop, debug=debug,
            weights=lambda m=module: [*m.parameters(), *m.buffers()],
        )
    return samplers
