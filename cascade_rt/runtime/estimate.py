"""Device-memory estimates without a GPU: parameter bytes + activations traced on the meta device.

`estimate_memory(presets, height, width, batch, dtype, mode)` builds every component on `meta` (no memory),
runs one real sampler step of each denoiser (`run_plan`, 1 step, CFG batch 2B) and Stage A's decode under
`LiveBytes`, a dispatch mode that adds up the storage bytes of every tensor an op creates and subtracts them
when the last tensor using that storage dies: the peak of that sum is what the caching allocator would have to
hold at once (conservatively: attention on meta is the math path, which materialises the score matrix that
flash attention avoids). The peak of a memory mode follows from the per-stage numbers:

* resident:   all weights + the largest activation peak
* sequential: max over stages of (its weights + its activations)
* offload:    everything but the streamed blocks + max over stages of (2 largest blocks + its activations)

`peak_allocated` is comparable to `torch.cuda.max_memory_allocated`; `peak_device` adds the CUDA context and
allocator slack (`OVERHEAD_BYTES`), i.e. what a card must have free. The GPU test of the memory modes
(tests/runtime/test_memory.py, run by scripts/gpu_check.sh) compares them with measurements.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cascade_rt.models.presets import build_model
from cascade_rt.models.text import build_text_encoder
from cascade_rt.runtime.memory import MEMORY_MODES, offload_units
from cascade_rt.sampling import build_plan, run_plan
from cascade_rt.stages import RUNTIME_PRESETS, SAMPLING, STAGES, TEXT_PRESETS, latent_shapes, model_set

GiB = 1024**3
OVERHEAD_BYTES = int(0.75 * GiB)  # CUDA context (~0.4-0.6 GiB with cuBLAS/cuDNN handles) + allocator slack

# what the edge preset runs: Stage C lite + Stage B lite, bf16, one large model on the GPU at a time
EDGE_PRESETS = {k: v for k, v in model_set(RUNTIME_PRESETS["edge"].size).items() if k in (*STAGES, "text")}


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode (peak and current)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage id -> [nbytes, live tensors using it]

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or id(t) in inputs:  # in-place ops return their input
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._refs:
                self._refs[key][1] += 1
            else:
                self._refs[key] = [storage.nbytes(), 1]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


@dataclass(frozen=True)
class StageEstimate:
    name: str
    weight_bytes: int
    activation_bytes: int  # peak live bytes of the stage's work, conditioning and sampler tensors included
    largest_unit_bytes: int  # the largest block `offload` streams
    streamed_bytes: int  # all blocks `offload` streams (the rest stays resident)


@dataclass(frozen=True)
class MemoryEstimate:
    mode: str
    height: int
    width: int
    batch: int
    stages: dict[str, StageEstimate]
    overhead_bytes: int = OVERHEAD_BYTES

    @property
    def peak_allocated(self) -> int:
        s = self.stages.values()
        if self.mode == "resident":
            return sum(e.weight_bytes for e in s) + max(e.activation_bytes for e in s)
        if self.mode == "sequential":
            return max(e.weight_bytes + e.activation_bytes for e in s)
        resident = sum(e.weight_bytes - e.streamed_bytes for e in s)
        return resident + max(2 * e.largest_unit_bytes + e.activation_bytes for e in s)

    @property
    def peak_device(self) -> int:
        return self.peak_allocated + self.overhead_bytes

    def fits(self, budget_bytes: int) -> bool:
        return self.peak_device <= budget_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "height": self.height, "width": self.width, "batch": self.batch,
            "peak_allocated_gib": round(self.peak_allocated / GiB, 3),
            "peak_device_gib": round(self.peak_device / GiB, 3),
            "stages": {k: {"weights_gib": round(v.weight_bytes / GiB, 3),
                           "activations_gib": round(v.activation_bytes / GiB, 3)}
                       for k, v in self.stages.items()},
        }


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _unit_bytes(module: nn.Module) -> tuple[int, int]:
    units = offload_units(module)
    sizes = [_bytes(u) for u in units] if units != [module] else [0]
    return max(sizes), sum(sizes)


def _stage_estimate(name: str, module: nn.Module, work) -> StageEstimate:
    with torch.no_grad(), LiveBytes() as tracker:
        work()
    largest, streamed = _unit_bytes(module)
    return StageEstimate(name, _bytes(module), tracker.peak, largest, streamed)


def _denoiser_work(model: nn.Module, stage: str, shapes: dict[str, tuple[int, ...]], dims: dict[str, int], cfg: bool):
    meta = dict(device="meta", dtype=model.dtype)
    batch = shapes[stage][0]

    def work() -> None:
        if stage == "c":
            def inputs():
                return (torch.empty(batch, 77, dims["text"], **meta), torch.empty(batch, 1, dims["pooled"], **meta),
                        torch.empty(batch, 1, dims["image"], **meta))

            cond, uncond = model.prepare_conditioning(*inputs()), model.prepare_conditioning(*inputs())
        else:
            effnet = torch.empty(shapes["c"], device="meta")
            pooled = lambda: torch.empty(batch, 1, dims["pooled"], **meta)  # noqa: E731
            hw = shapes["b"][-2:]
            cond = model.prepare_conditioning(effnet, pooled(), latent_hw=hw)
            uncond = model.prepare_conditioning(effnet, pooled(), latent_hw=hw)
        x = torch.empty(shapes[stage], device="meta")
        run_plan(model.denoise, x, build_plan(1, device="meta"), cond, uncond if cfg else None,
                 cfg=SAMPLING["c"].cfg if cfg else None)

    return work


def _build(preset: str, dtype: torch.dtype) -> nn.Module:
    if preset in TEXT_PRESETS:
        return build_text_encoder(preset, device="meta", dtype=dtype)

    return build_model(preset, device="meta", dtype=dtype)


def estimate_memory(
    presets: dict[str, str] | None = None,
    *,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    mode: str = "sequential",
    cfg_b: bool = True,
) -> MemoryEstimate:
    """Estimate the device memory of one generation. presets: {"c", "b", "a", "text"} -> preset names
    (default: the edge preset's); "text" may be a text preset ('text', 'text_tiny') or omitted.
    Stage C always runs with CFG."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r}")
    presets = dict(EDGE_PRESETS if presets is None else presets)
    shapes = latent_shapes(batch, height, width)
    models = {name: _build(p, dtype) for name, p in presets.items()}
    c = models["c"]
    dims = {"text": c.clip_txt_mapper.in_features, "pooled": c.clip_txt_pooled_mapper.in_features,
            "image": c.clip_img_mapper.in_features}
    stages: dict[str, StageEstimate] = {}
    for name, model in models.items():
        if name in ("c", "b"):
            work = _denoiser_work(model, name, shapes, dims, cfg=True if name == "c" else cfg_b)
        elif name == "a":
            work = lambda m=model: m.decode(torch.empty(shapes["b"], device="meta", dtype=m.dtype))  # noqa: E731
        else:  # text: prompts and negatives, batch B each, 77 tokens
            ids = lambda: torch.zeros(batch, model.config.context_length, dtype=torch.long, device="meta")  # noqa: E731
            work = lambda m=model: (m(ids(), ids()), m(ids(), ids()))  # noqa: E731
        stages[name] = _stage_estimate(name, model, work)
    return MemoryEstimate(mode, height, width, batch, stages)
