"""The batch size bounded by memory: `estimate.py`'s estimate against what the device has, before any work.

`check_batch_memory(presets, batch=, height=, width=, dtype=, ...)` refuses a batch whose estimated peak exceeds
the GPU's memory (CUDA) or the available RAM (CPU: psutil when installed, else MemAvailable in /proc/meminfo),
naming the option (`--batch` on the command line, `images_per_prompt` in Python), both numbers and the largest
batch that fits. The estimate traces batch 1 on the meta device once per (models, size, dtype) (about 1 s for the
tiny models, 10 s for the full ones, cached for the process) and scales the activations by the batch: they grow
linearly with it (tiny, 256x256: batch 10000 traced 108.6 GiB at Stage A, batch 1 x 10000 gives 110 GiB).
One image is never estimated: the resolution rules bound it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from cascade_rt.errors import ConfigError
from cascade_rt.runtime.estimate import MemoryEstimate, estimate_memory

GiB = 1024**3


@functools.lru_cache(maxsize=64)
def _per_image_estimate(presets: tuple[tuple[str, str], ...], height: int, width: int, dtype: Any) -> MemoryEstimate:
    return estimate_memory(dict(presets), height=height, width=width, batch=1, dtype=dtype, mode="resident")


def _is_cuda(device: Any) -> bool:
    return torch.device(device).type == "cuda"


def available_memory(device: Any) -> tuple[int, str] | None:
    """(bytes, where the number comes from) a generation on `device` may use, or None when unknown."""
    if _is_cuda(device):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return total, "the GPU's memory"
    try:
        import psutil  # optional: not a dependency of the package

        return psutil.virtual_memory().available, "the available RAM (psutil)"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "the available RAM (MemAvailable in /proc/meminfo)"
    except OSError:
        return None
    return None


def estimate_batch_bytes(
    presets: Mapping[str, str], *, batch: int, height: int, width: int, dtype: Any, mode: str = "resident",
    device: Any = "cpu", weights_loaded: bool = False,
) -> tuple[int, int, int]:
    """(bytes needed, bytes that do not grow with the batch, bytes per image). CUDA: the device peak of the memory
    mode (weights, activations, context). CPU: the weights (unless already loaded) + the largest activation peak."""
    est = _per_image_estimate(tuple(sorted(presets.items())), height, width, dtype)
    per_image = max(s.activation_bytes for s in est.stages.values())
    if _is_cuda(device):
        stages = {k: replace(s, activation_bytes=s.activation_bytes * batch) for k, s in est.stages.items()}
        need = replace(est, mode=mode, batch=batch, stages=stages).peak_device
    else:
        need = (0 if weights_loaded else sum(s.weight_bytes for s in est.stages.values())) + per_image * batch
    return need, need - per_image * batch, per_image


def check_batch_memory(
    presets: Mapping[str, str], *, batch: int, height: int, width: int, dtype: Any, mode: str = "resident",
    device: Any = "cpu", weights_loaded: bool = False, flag: str = "images_per_prompt", prompts: int = 1,
) -> None:
    """Refuse `batch` images at once (prompts x images per prompt) when the estimate exceeds the device's memory.

    presets: {"c", "b", "a", "text"} -> model preset names (as `estimate_memory` takes them)."""
    if batch <= 1:
        return
    limit = available_memory(device)
    if limit is None:
        return
    need, fixed, per_image = estimate_batch_bytes(presets, batch=batch, height=height, width=width, dtype=dtype,
                                                  mode=mode, device=device, weights_loaded=weights_loaded)
    budget, where = limit
    if need <= budget:
        return
    prompts = max(prompts, 1)
    images = max(0, (budget - fixed) // max(per_image, 1))  # the most images at once that fit
    if images < 1:
        hint = "lower the resolution or use smaller models"
    elif prompts == 1:
        hint = f"lower {flag} to at most {images}"
    else:
        hint = f"give at most {images} images at once ({prompts} prompts x {flag} is {batch})"
    raise ConfigError(
        f"{flag}={batch // prompts}: {batch} images of {height}x{width} need about {need / GiB:.1f} GiB (estimate) "
        f"but {where} is {budget / GiB:.1f} GiB; {hint}, or generate in several runs"
    )
