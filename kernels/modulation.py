"""Timestep modulation ``x * (1 + a) + b`` (TimestepBlock), fused with the residual add before it and the
LayerNorm after it.

In Stage B/C a level is a repeated ``ResBlock -> TimestepBlock -> AttnBlock`` chain:
``y = x_res + mlp(...)`` (ResBlock's residual), ``z = y * (1 + a) + b`` (TimestepBlock), ``n = LN(z)`` (the
AttnBlock's norm; its residual also needs ``z``). Unfused that is three memory-bound passes
(add R2W1, modulate R1W1, LN R1W1 = 7 tensor transfers). This kernel does them in one:
``z = (x + residual) * (1 + a) + b`` and optionally ``n = LN_C(z)`` (no affine, eps 1e-6, fp32 statistics), for
R2W2 = 4 transfers with both fusions, R2W1 with the residual only, R1W1 for the plain modulation.
Why these fusions: ``a, b`` are per (sample, channel) so the modulation is free to apply wherever the tensor
passes through registers; the residual add and the LayerNorm are the adjacent passes over the same tensor, and
the GEMMs on either side stay in cuBLAS. (How the triton backend pairs the blocks: ``backend.py``.)

One program owns ``BLOCK_P`` pixels x ``BLOCK_C`` channels; with the LayerNorm ``BLOCK_C`` covers all channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, check_shape, check_tensor, pick_configs, pruned

EPS = 1e-6


def modulation_ref(x, a, b, residual=None, return_norm: bool = False, eps: float = EPS):
    """Plain torch on NHWC ``x`` (B, H, W, C) with ``a``, ``b`` of shape (B, C) (the TimestepBlock chunks)."""
    y = x if residual is None else x + residual
    z = y * (1 + a[:, None, None, :]) + b[:, None, None, :]
    if not return_norm:
        return z
    return z, torch.nn.functional.layer_norm(z.float(), (z.shape[-1],), eps=eps).to(z.dtype)


def _gpu_configs():
    """The full GPU autotune list (before ``_keep`` prunes it per shape), also under the interpreter."""
    return [triton.Config({"BLOCK_P": bp}, num_warps=nw) for bp in (1, 2, 4, 8, 16, 32, 64) for nw in (2, 4, 8, 16)]


def _configs():
    return pick_configs(_gpu_configs(), triton.Config({"BLOCK_P": 32}, num_warps=4))


def _keep(cfg, args) -> bool:
    per_thread = cfg.kwargs["BLOCK_P"] * args["BLOCK_C"] // (32 * cfg.num_warps)
    return 8 <= per_thread <= 32 and cfg.kwargs["BLOCK_P"] <= triton.next_power_of_2(args["P"])


@triton.autotune(configs=_configs(), key=["P", "C", "HAS_RES", "WRITE_NORM"],
                 prune_configs_by={"early_config_prune": pruned(_keep)})
@triton.jit
def _modulation_kernel(x_ptr, res_ptr, a_ptr, b_ptr, out_ptr, norm_ptr, P, C, sab, sbb, eps,
                       HAS_RES: tl.constexpr, WRITE_NORM: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    num_pb = tl.cdiv(P, BLOCK_P)
    bi = tl.program_id(0) // num_pb
    offs_p = (tl.program_id(0) % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m = (offs_p < P)[:, None] & cmask[None, :]
    offs = bi.to(tl.int64) * P * C + offs_p[:, None] * C + offs_c[None, :]
    y = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + bi * sab + offs_c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + bi * sbb + offs_c, mask=cmask, other=0.0).to(tl.float32)
    z = y * (1.0 + a[None, :]) + b[None, :]
    tl.store(out_ptr + offs, cast_to(z, out_ptr.dtype.element_ty), mask=m)
    if WRITE_NORM:  # BLOCK_C >= C here: the whole row is in registers
        mean = tl.sum(z, axis=1) / C  # masked lanes hold 0
        d = tl.where(m, z - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
        tl.store(norm_ptr + offs, cast_to(d * rstd[:, None], norm_ptr.dtype.element_ty), mask=m)


def modulation(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor | None = None, *,
               return_norm: bool = False, eps: float = EPS):
    """``z = (x [+ residual]) * (1 + a) + b`` on NHWC ``x`` (B, H, W, C); ``a``, ``b``: (B, C), unit channel
    stride (column slices of the mapper output are fine). With ``return_norm`` returns ``(z, LN_C(z))``."""
    check_tensor(x, "x", ndim=4)
    if not x.is_contiguous():
        raise ValueError(f"x must be a contiguous NHWC tensor (B, H, W, C), got strides {x.stride()}")
    bsz, h, w, c = x.shape
    for name, t in (("a", a), ("b", b)):
        check_tensor(t, name, ndim=2, device=x.device)
        check_shape(t, name, (bsz, c))
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have unit channel stride, got strides {t.stride()}")
    if residual is not None:
        check_tensor(residual, "residual", ndim=4, dtypes=(x.dtype,), device=x.device)
        check_shape(residual, "residual", x.shape)
        if not residual.is_contiguous():
            raise ValueError("residual must be a contiguous NHWC tensor like x")
    if return_norm and c > 8192:
        raise ValueError(f"return_norm keeps a whole pixel's channels in registers; C={c} > 8192 is unsupported")
    p = h * w
    block_c = triton.next_power_of_2(c) if return_norm else min(256, triton.next_power_of_2(c))
    out = torch.empty_like(x)
    norm = torch.empty_like(x) if return_norm else out
    grid = lambda m: (bsz * triton.cdiv(p, m["BLOCK_P"]), triton.cdiv(c, block_c))  # noqa: E731
    _modulation_kernel[grid](x, x if residual is None else residual, a, b, out, norm, p, c, a.stride(0),
                             b.stride(0), eps, HAS_RES=residual is not None, WRITE_NORM=return_norm,
                             BLOCK_C=block_c)
    return (out, norm) if return_norm else out
