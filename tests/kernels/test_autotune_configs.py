"""The GPU autotune config lists and their ``early_config_prune`` predicates, at the released models' real shapes.

Under the interpreter ``pick_configs`` hands every kernel ONE config, so the GPU lists and the prune predicates
never run in CPU CI. This file checks them on the CPU without launching anything:

1. The real launches are TRACED, not hand-written: each released preset is built on the ``meta`` device, the
   ``triton`` backend is applied, and the model runs once at 1024^2 / 2048^2 (latents from
   ``stages.latent_shapes``), model batch 2 and 8 (CFG doubles the pipeline batch), bf16 and fp32. The
   autotuned kernels are swapped for recorders, so every launcher computes its arguments itself (N, S, HEAD_DIM,
   BLOCK_D, BLOCK_S, PRECISION, P, C, BLOCK_C, SPLIT, ...) and the recorder keeps them with the grid callable.
   Only gelu_grn's SPLIT needs a GPU: ``_default_split`` runs with an H100's 132 SMs. (The tracer is
   ``cascade_rt.kernels.gpu_compile.traced``.)
2. Each kernel's full GPU list (``_gpu_configs`` & co., the list ``pick_configs`` is given) is pruned with the
   kernel's predicate, called as Triton calls the hook: ``predicate(config, {**named_args, **kwargs})``. Both
   come from ``gpu_compile.KERNELS``, the one table of the kernels; this file adds only what it checks beyond it.
3. On the kept configs: at least one survives, at least two where the list allows (``MIN_KEPT``); block sizes
   and num_warps are powers of two; at most 1024 threads; shared memory fits an H100 block (227 KB): for the
   attention kernel the estimate its own ``_keep`` uses, for the others (no tl.dot, no explicit staging) a
   conservative bound of one full fp32 copy of the 2-D register tile (what a layout conversion or a cross-warp
   reduction can stage at most); at most 64 fp32 tile values per thread; tl.dot operand dims >= 16; the grid
   within CUDA's limits.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Callable
from unittest import mock

import pytest
import torch
import triton

from cascade_rt.kernels import _common
from cascade_rt.kernels import attention as attn_mod
from cascade_rt.kernels import dwconv_layernorm as dwln_mod
from cascade_rt.kernels import gelu_grn as grn_mod
from cascade_rt.kernels import gpu_compile as gc
from cascade_rt.kernels import modulation as mod_mod
from cascade_rt.kernels import stage_a_block as sa_mod

H100_SMEM_PER_BLOCK = 227 * 1024  # sm_90: max shared memory per block (opt-in)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_FP32_TILE_PER_THREAD = 64  # register budget: 255 regs/thread leave room for ~64 live tile values + temporaries

MODELS = gc.MODELS
RESOLUTIONS = [1024, 2048]
BATCHES = [2, 8]  # model batch (the pipeline's batch x 2 with CFG)
DTYPES = [torch.bfloat16, torch.float32]


def _pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def _attention_smem(cfg: triton.Config, args: dict) -> int:
    """attention.py ``_keep``'s estimate: num_stages pipelined K and V tiles + the Q tile."""
    bm, bn, d = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], args["BLOCK_D"]
    itemsize = 4 if args["PRECISION"] == "ieee" else 2
    return cfg.num_stages * 2 * bn * d * itemsize + bm * d * itemsize


@dataclass(frozen=True)
class Kernel:
    """One autotuned kernel: its entry in ``gpu_compile.KERNELS`` (name, module attribute, full GPU list, prune
    predicate; the one table of them) and what this file checks beyond it."""
    spec: gc.KernelSpec
    decorated: Callable[[], list]  # what the @autotune decorator is given (pick_configs around gpu_configs)
    tile: Callable[[triton.Config, dict], tuple[int, int]] | None  # the fp32 register tile (rows, cols)
    dot_dims: Callable[[triton.Config, dict], list[int]] | None = None  # every M/N/K of its tl.dot calls

    name = property(lambda self: self.spec.name)
    module = property(lambda self: self.spec.module)
    gpu_configs = property(lambda self: self.spec.gpu_configs)  # the full GPU list, as the kernel module exposes it
    predicate = property(lambda self: self.spec.predicate)  # the early_config_prune predicate

    @property
    def autotuner(self):
        return gc.ORIGINAL[self.name]


def _kernel(name: str, decorated, tile, dot_dims=None) -> Kernel:
    return Kernel(gc.BY_NAME[name], decorated, tile, dot_dims)


KERNELS = [
    # q @ k^T: (BLOCK_M x BLOCK_D) @ (BLOCK_D x BLOCK_N or _S); p @ v: (BLOCK_M x BLOCK_N or _S) @ (.. x BLOCK_D)
    _kernel("attention", attn_mod._configs, None,
            lambda c, a: [c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], a["BLOCK_S"], a["BLOCK_D"]]),
    _kernel("gelu_grn_stats", lambda: grn_mod._tile_configs(64, 128),
            lambda c, a: (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"])),
    _kernel("gelu_grn_apply", lambda: grn_mod._tile_configs(64, 128),
            lambda c, a: (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"])),
    _kernel("dwconv_layernorm", dwln_mod._configs, lambda c, a: (c.kwargs["BLOCK_P"], a["BLOCK_C"])),
    _kernel("modulation", mod_mod._configs, lambda c, a: (c.kwargs["BLOCK_P"], a["BLOCK_C"])),
    _kernel("layernorm_modulate", sa_mod._ln_configs, lambda c, a: (c.kwargs["BLOCK_P"], a["BLOCK_C"])),
    _kernel("dwconv_replicate_residual", sa_mod._conv_configs,
            lambda c, a: (c.kwargs["BLOCK_W"], c.kwargs["BLOCK_C"])),
]
BY_NAME = {k.name: k for k in KERNELS}
# gpu_compile.KERNELS also lists gelu_grn_finalize, which is not autotuned (no config list, no prune predicate:
# one fixed launch config, checked by test_gpu_compile.py); every other kernel there is checked here
# (test_every_autotuned_kernel_is_checked).
NOT_AUTOTUNED = {"gelu_grn_finalize"}

# Fewest configs a real launch must keep: 2 for every kernel (a choice for the autotuner to make). Every list
# allows it at the released shapes; the tightest are the fp32 lists that keep only spill-free configs
# (docs/kernels.md): dwconv_layernorm in fp32 keeps exactly 2 per shape.
MIN_KEPT = {k.name: 2 for k in KERNELS}


# ---------------------------------------------------------------------------------------------------- tracing
# The tracer is cascade_rt.kernels.gpu_compile's (it also feeds the ahead-of-time compile check).
Launch = gc.Launch


def traced(model: str, res: int, batch: int, dtype: torch.dtype) -> tuple[Launch, ...]:
    """Every autotuned launch of one denoiser step (Stage A: one decode), deduplicated, in call order."""
    return tuple(x for x in gc.traced(model, res, batch, dtype) if x.kernel in BY_NAME)


def kept(kernel: Kernel, launch: Launch) -> list[triton.Config]:
    return gc.kept(kernel.spec, launch)


CASES = [pytest.param(m, r, b, d, id=f"{m}-{r}-b{b}-{str(d).replace('torch.', '')}")
         for m in MODELS for r in RESOLUTIONS for b in BATCHES for d in DTYPES]


# ---------------------------------------------------------------------------------------------------- checks
def _problems(kernel: Kernel, launch: Launch) -> list[str]:
    """Everything wrong with one launch's kept configs (empty list: all good)."""
    a = launch.args
    shown = [k for k in a if k in kernel.autotuner.keys or k.startswith("BLOCK")]  # the autotune key + tiles
    where = f"{kernel.name} " + ", ".join(f"{k}={a[k]}" for k in shown)
    out = []
    keep = kept(kernel, launch)
    if len(keep) < MIN_KEPT[kernel.name]:
        out.append(f"{where}: only {len(keep)} of {len(kernel.gpu_configs())} configs kept "
                   f"(need >= {MIN_KEPT[kernel.name]})")
    # the autotuner's own hook, called as Triton calls it, prunes to the same list
    hooked = kernel.autotuner.early_config_prune(kernel.gpu_configs(), launch.nargs, **launch.kwargs)
    if keep and [str(c) for c in hooked] != [str(c) for c in keep]:
        out.append(f"{where}: the autotuner's early_config_prune keeps {len(hooked)} configs, "
                   f"the predicate {len(keep)}")
    for k, v in a.items():  # launcher-computed block constexprs feed tl.arange: powers of two
        if k.startswith("BLOCK") and not _pow2(v):
            out.append(f"{where}: launcher passes {k}={v}, not a power of two")
    for c in keep:
        cw = f"{where} | {c}"
        for k, v in c.kwargs.items():
            if not _pow2(v):
                out.append(f"{cw}: {k}={v} is not a power of two")
        if not _pow2(c.num_warps) or 32 * c.num_warps > MAX_THREADS_PER_BLOCK:
            out.append(f"{cw}: num_warps={c.num_warps}")
        if kernel.dot_dims is not None:
            smem = _attention_smem(c, a)
            if smem > H100_SMEM_PER_BLOCK:
                out.append(f"{cw}: shared memory estimate {smem} B > {H100_SMEM_PER_BLOCK} B")
            small = [d for d in kernel.dot_dims(c, a) if d < 16]
            if small:
                out.append(f"{cw}: tl.dot dims {small} < 16")
        if kernel.tile is not None:
            rows, cols = kernel.tile(c, a)
            smem = rows * cols * 4
            if smem > H100_SMEM_PER_BLOCK:
                out.append(f"{cw}: an fp32 tile of {rows}x{cols} = {smem} B > {H100_SMEM_PER_BLOCK} B of shared memory")
            per_thread = rows * cols // (32 * c.num_warps)
            if per_thread > MAX_FP32_TILE_PER_THREAD:
                out.append(f"{cw}: {per_thread} fp32 tile values per thread > {MAX_FP32_TILE_PER_THREAD}")
        grid = launch.grid({**a, **c.all_kwargs()}) if callable(launch.grid) else launch.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if not all(1 <= g <= lim for g, lim in zip(grid, MAX_GRID)):
            out.append(f"{cw}: grid {grid} outside (1..{MAX_GRID})")
    return out


@pytest.mark.parametrize("model, res, batch, dtype", CASES)
def test_kept_configs_at_real_shapes(model, res, batch, dtype):
    launches = traced(model, res, batch, dtype)
    seen = {launch.kernel for launch in launches}
    expected = ({"layernorm_modulate", "dwconv_replicate_residual"} if model == "stage_a" else
                {"attention", "gelu_grn_stats", "gelu_grn_apply", "dwconv_layernorm", "modulation",
                 "layernorm_modulate"})
    assert seen == expected, f"{model}: traced kernels {sorted(seen)}, expected {sorted(expected)}"
    problems = [p for launch in launches for p in _problems(BY_NAME[launch.kernel], launch)]
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])


# ------------------------------------------------------------- the traced shapes are the documented ones
def _distinct(launches, kernel, *names):
    return sorted({tuple(launch.args[n] for n in names) for launch in launches if launch.kernel == kernel})


def test_traced_shapes_are_the_released_models():
    """Pins what the tracer found (so that the sweep above really covers the models' shapes)."""
    c = traced("stage_c", 1024, 2, torch.bfloat16)
    # 24x24 latent, 32 heads of 64, 77 text + 4 pooled + 4 image conditioning tokens; bf16 -> "tf32"
    assert _distinct(c, "attention", "N", "S", "heads", "HEAD_DIM", "BLOCK_D", "BLOCK_S", "PRECISION") == [
        (576, 85, 32, 64, 64, 64, "tf32")]
    # GRN over 4 * 2048 channels; SPLIT from 132 SMs: cdiv(4 * 132, 2 * cdiv(8192, 128)) = 5 splits of 116 rows
    assert _distinct(c, "gelu_grn_stats", "P", "C", "SPLIT", "rows_per_split") == [(576, 8192, 5, 116)]
    assert _distinct(c, "modulation", "P", "C", "BLOCK_C", "WRITE_NORM") == [(576, 2048, 2048, True)]
    c32 = traced("stage_c", 2048, 8, torch.float32)
    assert _distinct(c32, "attention", "N", "S", "PRECISION") == [(2304, 85, "ieee")]
    assert _distinct(traced("stage_c_lite", 1024, 2, torch.bfloat16), "attention", "N", "heads", "HEAD_DIM") == [
        (576, 24, 64)]

    b = traced("stage_b", 1024, 2, torch.bfloat16)
    # 256x256 latent, patch 2: levels at 128, 64, 32, 16; attention (20 heads of 64) on the two lower ones, S=4
    assert _distinct(b, "dwconv_layernorm", "H", "C", "BLOCK_C") == [
        (16, 1280, 2048), (32, 1280, 2048), (64, 640, 1024), (128, 320, 512)]
    assert _distinct(b, "attention", "N", "S", "heads", "HEAD_DIM", "BLOCK_S") == [
        (256, 4, 20, 64, 16), (1024, 4, 20, 64, 16)]
    assert _distinct(b, "gelu_grn_stats", "P", "C", "SPLIT") == [
        (256, 5120, 4), (1024, 5120, 7), (4096, 2560, 14), (16384, 1280, 27)]
    bl = traced("stage_b_lite", 1024, 2, torch.bfloat16)
    assert _distinct(bl, "attention", "N", "heads", "HEAD_DIM") == [(256, 18, 64), (1024, 18, 64)]
    assert _distinct(bl, "dwconv_layernorm", "H", "C") == [(16, 1152), (32, 1152), (64, 576), (128, 320)]

    a = traced("stage_a", 1024, 2, torch.bfloat16)
    # decode: 12 bottleneck blocks at 384 channels on the 256x256 latent, one at 192 on 512x512
    assert _distinct(a, "dwconv_replicate_residual", "H", "W", "C") == [(256, 256, 384), (512, 512, 192)]
    assert _distinct(a, "layernorm_modulate", "P", "C", "HAS_GAMMA") == [
        (2 * 256 * 256, 384, True), (2 * 512 * 512, 192, True)]


# ------------------------------------------------------------------ the lists tested are the lists used
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_gpu_list_is_what_the_decorator_gets_on_a_gpu(kernel):
    with mock.patch.object(_common, "interpreting", lambda: False):
        on_gpu = kernel.decorated()
    gpu = kernel.gpu_configs()
    assert len(gpu) >= 2 and [str(c) for c in on_gpu] == [str(c) for c in gpu]
    with mock.patch.object(_common, "interpreting", lambda: True):
        assert len(kernel.decorated()) == 1
    # the autotuner's prune hook wraps this very predicate
    prune = kernel.autotuner.early_config_prune
    assert inspect.getclosurevars(prune).nonlocals["predicate"] is kernel.predicate


def test_every_autotuned_kernel_is_checked():
    """The kernels checked here are gpu_compile's table less the ones without an autotuner."""
    assert set(BY_NAME) == set(gc.BY_NAME) - NOT_AUTOTUNED
    assert all(hasattr(gc.ORIGINAL[n], "configs") for n in BY_NAME)  # triton.autotune objects
    assert not any(hasattr(gc.ORIGINAL[n], "configs") for n in NOT_AUTOTUNED)  # plain triton.jit functions


def test_only_the_attention_kernel_uses_tl_dot():
    """The tl.dot dim check covers every kernel that multiplies tiles."""
    for kernel in KERNELS:
        # either tl.dot itself or _common's ``dot`` wrapper (imported by name)
        uses_dot = "tl.dot(" in inspect.getsource(kernel.module) or hasattr(kernel.module, "dot")
        assert uses_dot == (kernel.dot_dims is not None), kernel.name


def _with_list(kernel: Kernel, gpu_configs) -> Kernel:
    """``kernel`` with another GPU list and a predicate that keeps every config (its other checks unchanged)."""
    spec = replace(kernel.spec, gpu_configs=gpu_configs, predicate=lambda c, a: True)
    return replace(kernel, spec=spec)


def test_checks_can_fail():
    """The checks above reject what they should (guards against a vacuous sweep)."""
    launch = next(x for x in traced("stage_c", 1024, 2, torch.float32) if x.kernel == "attention")
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)
    assert _attention_smem(big, launch.args) == 4 * 2 * 128 * 64 * 4 + 128 * 64 * 4 == 294912  # > 227 KB
    assert not attn_mod._keep(big, launch.args)
    bad = _with_list(BY_NAME["attention"], lambda: [big])
    msgs = _problems(bad, launch)
    assert any("only 1 of 1" in m for m in msgs) and any("shared memory estimate 294912" in m for m in msgs)
    odd = _with_list(BY_NAME["modulation"], lambda: [triton.Config({"BLOCK_P": 48}, num_warps=4),
                                                      triton.Config({"BLOCK_P": 256}, num_warps=2)])
    mod = next(x for x in traced("stage_c", 1024, 2, torch.bfloat16) if x.kernel == "modulation")
    msgs = _problems(odd, mod)
    assert any("BLOCK_P=48 is not a power of two" in m for m in msgs)
    assert any("fp32 tile of 256x2048" in m for m in msgs) and any("values per thread" in m for m in msgs)
