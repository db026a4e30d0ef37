"""Helpers shared by the kernel files: input validation, interpreter detection, autotune config selection.

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU test mode) every kernel gets ONE small config:
autotuning there would run each config through the (slow) interpreter for nothing. On a GPU the full list is
pruned by a per-kernel predicate that knows the launch shape, then benchmarked once per autotune key. The
benchmark runs on the first call for a key, so run one forward per shape before CUDA-graph capture
(``cascade_rt.kernels.backend.warmup``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The config list a kernel is decorated with: the full list on a GPU, a single config in the interpreter."""
    return [interpreter_config] if interpreting() else gpu_configs


def pruned(predicate):
    """Turn ``predicate(config, named_args) -> bool`` into an autotune ``early_config_prune`` hook.

    Falls back to the full list when the predicate rejects everything (autotune needs at least one config).
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if predicate(c, args)]
        return kept or list(configs)

    return prune


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, device=None) -> None:
    """Raise a readable TypeError / ValueError when ``t`` is not a usable kernel input."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "triton is imported to run them on the CPU through the interpreter")


def check_nhwc(x, name: str = "x") -> None:
    """An activation in the kernels' layout: (B, H, W, C) with a contiguous channel-last memory layout."""
    check_tensor(x, name, ndim=4)
    if not x.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous NHWC tensor (B, H, W, C); got shape {tuple(x.shape)} with strides "
            f"{x.stride()}. From an NCHW tensor use x.permute(0, 2, 3, 1).contiguous(), or keep the model in "
            "torch.channels_last so that x.permute(0, 2, 3, 1) is already contiguous")


def check_shape(t, name: str, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# The Triton interpreter (3.x) converts fp32 -> bf16 by truncation (and its "rtne" mode drops the carry into the
# exponent), while the GPU rounds to nearest even. Round in fp32 bits first under the interpreter so that the CPU
# tests see the same numbers as the GPU; on the GPU this compiles to a plain cast.
_INTERPRET = tl.constexpr(interpreting())


@triton.jit
def cast_to(y, dtype: tl.constexpr):
    """``y.to(dtype)`` with round-to-nearest-even, also in the interpreter (see the note above)."""
    if _INTERPRET and dtype == tl.bfloat16:
        u = y.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        y = u.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)``. The 3.x interpreter multiplies bf16 operands as their raw uint16 bits; since a
    bf16 x bf16 product is exact in fp32 (and the GPU accumulates in fp32), upcasting there is a faithful stand-in."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)
