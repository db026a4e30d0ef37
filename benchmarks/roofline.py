"""Roofline inputs: FLOPs and bytes per denoiser step (counted on the `meta` device), and the device's matmul rate.

`stage_costs(case, dtype)` builds each stage's model on `meta` (no memory, seconds even for the 3.6B prior) and
counts one `denoise` call at the batch the sampler really runs (2B under CFG) with
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; elementwise ops count 0), plus:

* weight bytes: every parameter and buffer of the model in its dtype (each read at least once per step);
* activation bytes: the bytes of every op output written during the step, unfused (an upper bound of what a fused
  backend moves; with weight bytes it gives an arithmetic intensity).

`matmul_tflops(device)` times a large matmul in the same run: bf16 on a GPU (the rate achieved TFLOP/s is compared
with), fp32 on a CPU.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from cascade_rt.benchmarks.inputs import conditioning_dims, latent_hw
from cascade_rt.benchmarks.workloads import Case
from cascade_rt.models import build_model

NO_WRITE_OPS = ("_unsafe_view.default", "detach.default", "alias.default", "lift_fresh.default")


class _OutputBytes(TorchDispatchMode):
    """Sums the bytes of every tensor an op writes (views and aliases excluded: they write nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.__name__ not in NO_WRITE_OPS:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
        return out


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of one call of `fn` (a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op).replace("aten.", ""): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def count_activation_bytes(fn: Callable[[], object]) -> int:
    """Bytes of every tensor the ops of one call of `fn` write (unfused: each op's output counted once)."""
    mode = _OutputBytes()
    with mode:
        fn()
    return mode.total


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@functools.lru_cache(maxsize=64)
@torch.no_grad()
def _stage_cost(stage: str, preset: str, pooled_preset: str, height: int, width: int, dtype: torch.dtype) -> dict:
    """Cost of one model call of `stage` at batch 1 (every op is per sample, so costs scale with the batch)."""
    model = build_model(preset, device="meta", dtype=dtype)
    meta, n = dict(device="meta"), 1
    if stage == "c":
        dims = conditioning_dims(model, build_model(pooled_preset, **meta))
        cond = model.prepare_conditioning(
            torch.zeros(n, 77, dims["text"], **meta), torch.zeros(n, 1, dims["pooled"], **meta),
            torch.zeros(n, 1, dims["image"], **meta),
        )
        x = torch.zeros(n, dims["c_in_c"], *latent_hw("c", height, width), **meta)
        fn = lambda: model.denoise(x, torch.full((n,), 0.5, **meta), **cond)  # noqa: E731
    elif stage == "b":
        hw = latent_hw("b", height, width)
        effnet = torch.zeros(n, model.effnet_mapper[0].in_channels, *latent_hw("c", height, width), **meta)
        cond = model.prepare_conditioning(
            effnet, torch.zeros(n, 1, model.clip_mapper.in_features, **meta), latent_hw=hw
        )
        x = torch.zeros(n, model.c_in, *hw, **meta)
        fn = lambda: model.denoise(x, torch.full((n,), 0.5, **meta), **cond)  # noqa: E731
    else:
        x = torch.zeros(n, model.c_latent, *latent_hw("a", height, width), **meta)
        fn = lambda: model.decode(x)  # noqa: E731
    counter, written = FlopCounterMode(display=False), _OutputBytes()
    with counter, written:
        fn()
    return {
        "preset": preset,
        "flops_per_sample": int(counter.get_total_flops()),
        "flops_by_op_per_sample": {
            str(k).replace("aten.", ""): int(v) for k, v in counter.get_flop_counts()["Global"].items()
        },
        "weight_bytes": model_bytes(model),
        "activation_bytes_per_sample": written.total,
        "params": sum(p.numel() for p in model.parameters()),
    }


def stage_costs(case: Case, dtype: torch.dtype) -> dict[str, dict]:
    """FLOPs/bytes per model call, and per image batch, for Stage C, B (denoise) and A (decode) of a case."""
    p, wl = case.presets, case.workload
    out = {}
    for stage, settings in (("c", case.stage_c), ("b", case.stage_b), ("a", None)):
        n = case.batch * (2 if settings is not None and settings.uses_cfg else 1)
        one = _stage_cost(stage, p[stage], p["b"], wl.height, wl.width, dtype)
        calls = settings.steps if settings is not None else 1  # model calls per image batch
        out[stage] = {
            "preset": one["preset"],
            "batch": n,  # the batch one model call sees (2B under CFG)
            "calls": calls,
            "flops_per_call": one["flops_per_sample"] * n,
            "flops_total": one["flops_per_sample"] * n * calls,
            "flops_by_op_per_call": {k: v * n for k, v in one["flops_by_op_per_sample"].items()},
            "weight_bytes": one["weight_bytes"],
            "activation_bytes_per_call": one["activation_bytes_per_sample"] * n,
            "params": one["params"],
        }
    return out


def matmul_tflops(device: torch.device | str, size: int | None = None, min_seconds: float = 0.5) -> dict:
    """Measured dense matmul rate: bf16 8192³ on CUDA (timed with events), fp32 on the CPU."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = size or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters, elapsed = 0, 0.0
    while elapsed < min_seconds:
        batch = max(1, iters or 5)
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                a @ b
            end.record()
            torch.cuda.synchronize()
            elapsed += start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(batch):
                a @ b
            elapsed += time.perf_counter() - t0
        iters += batch
    return {
        "tflops": 2 * n**3 * iters / elapsed / 1e12,
        "dtype": str(dtype).replace("torch.", ""),
        "size": n,
        "iters": iters,
        "threads": torch.get_num_threads(),
    }


def achieved(flops: int, ms: float, peak_tflops: float) -> dict[str, float]:
    """Achieved TFLOP/s for `flops` done in `ms`, and its share of the measured matmul rate (%)."""
    tflops = flops / (ms / 1e3) / 1e12 if ms > 0 else 0.0
    return {"tflops": tflops, "pct_of_matmul": 100.0 * tflops / peak_tflops if peak_tflops > 0 else 0.0}
