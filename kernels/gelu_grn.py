"""Exact-erf GELU + GlobalResponseNorm (ConvNeXt-V2 GRN), the middle of ResBlock's channelwise MLP.

``g = GELU(h)``; ``Gx[b, c] = ||g[b, :, :, c]||_2`` over H*W; ``Nx = Gx / (mean_c Gx + 1e-6)``;
``out = gamma * (g * Nx) + beta + g = g * (gamma * Nx + 1) + beta``. ``h`` is the pre-GELU output of Linear1,
NHWC (B, H, W, 4C).

Passes (GELU is recomputed from ``h`` in pass 3 instead of being written in pass 1):
  1. ``_gelu_grn_stats_kernel``   reads h, writes fp32 partial sums of g^2: (B, SPLIT, C) (deterministic
                                   two-stage reduction: no atomics, no zero-fill, nothing to reset under a graph)
  2. ``_gelu_grn_finalize_kernel`` one program per sample: Gx, its channel mean, ``scale = gamma*Nx + 1`` (B, C) fp32
  3. ``_gelu_grn_apply_kernel``   reads h, writes ``GELU(h) * scale + beta``
Bytes per element of h: 2 reads + 1 write = 3 * itemsize (6 B in bf16). Writing GELU(h) in pass 1 and
reading it back would be 4 * itemsize; torch eager (GELU R+W, norm R, mean/div tiny, 3 elementwise R+W's) is
~9 * itemsize. The partials and scale are B*C*(SPLIT+1) fp32 values: negligible.
Fusing pass 1 into Linear1's epilogue would save one more read but needs a Triton GEMM in place of cuBLAS;
not done here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, check_tensor, interpreting, pick_configs, pruned

EPS = 1e-6


def gelu_grn_ref(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Plain torch, the official GRN after nn.GELU() on an NHWC tensor; the L2 norm is taken in fp32."""
    x = torch.nn.functional.gelu(h)
    gx = torch.norm(x.float(), p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    c = h.shape[-1]
    return (gamma.reshape(c) * (x * nx.to(x.dtype)) + beta.reshape(c) + x).to(h.dtype)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


def _gpu_tile_configs():
    """The full GPU autotune list (before ``_keep_tile`` prunes it per shape), also under the interpreter."""
    return [triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw)
            for bp in (8, 16, 32, 64) for bc in (64, 128, 256) for nw in (4, 8)]


def _tile_configs(interp_p, interp_c):
    return pick_configs(_gpu_tile_configs(), triton.Config({"BLOCK_P": interp_p, "BLOCK_C": interp_c}, num_warps=4))


def _keep_tile(cfg, args) -> bool:
    # 8..32 elements per thread, channel tile no wider than the channels.
    tile = cfg.kwargs["BLOCK_P"] * cfg.kwargs["BLOCK_C"]
    return (8 <= tile // (32 * cfg.num_warps) <= 32
            and cfg.kwargs["BLOCK_C"] <= max(64, triton.next_power_of_2(args["C"])))


@triton.autotune(configs=_tile_configs(64, 128), key=["P", "C", "SPLIT"],
                 prune_configs_by={"early_config_prune": pruned(_keep_tile)})
@triton.jit
def _gelu_grn_stats_kernel(h_ptr, part_ptr, P, C, rows_per_split, SPLIT,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2)
    cmask = offs_c < C
    p_start = s * rows_per_split
    p_end = tl.minimum(p_start + rows_per_split, P)
    base = h_ptr + b.to(tl.int64) * P * C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        m = (offs_p < p_end)[:, None] & cmask[None, :]
        x = tl.load(base + offs_p[:, None] * C + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
        g = _gelu(x)  # GELU(0) = 0: masked lanes add nothing
        acc += g * g
    tl.store(part_ptr + (b * SPLIT + s) * C + offs_c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _gelu_grn_finalize_kernel(part_ptr, gamma_ptr, scale_ptr, C, eps, SPLIT, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        ss = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SPLIT):
            ss += tl.load(part_ptr + (b * SPLIT + s) * C + offs, mask=offs < C, other=0.0)
        total += tl.sqrt(ss)
    denom = tl.sum(total, axis=0) / C + eps
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        ss = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SPLIT):
            ss += tl.load(part_ptr + (b * SPLIT + s) * C + offs, mask=offs < C, other=0.0)
        gamma = tl.load(gamma_ptr + offs, mask=offs < C, other=0.0).to(tl.float32)
        tl.store(scale_ptr + b * C + offs, gamma * (tl.sqrt(ss) / denom) + 1.0, mask=offs < C)


@triton.autotune(configs=_tile_configs(64, 128), key=["P", "C"],
                 prune_configs_by={"early_config_prune": pruned(_keep_tile)})
@triton.jit
def _gelu_grn_apply_kernel(h_ptr, scale_ptr, beta_ptr, out_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    num_pb = tl.cdiv(P, BLOCK_P)
    b = tl.program_id(0) // num_pb
    offs_p = (tl.program_id(0) % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m = (offs_p < P)[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * P * C + offs_p[:, None] * C + offs_c[None, :]
    g = _gelu(tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32))
    scale = tl.load(scale_ptr + b * C + offs_c, mask=cmask, other=0.0)
    beta = tl.load(beta_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_to(g * scale[None, :] + beta[None, :], out_ptr.dtype.element_ty), mask=m)


def _default_split(bsz: int, p: int, c: int, device: torch.device) -> int:
    """Split H*W so that pass 1 has ~4 programs per SM (with its 128-channel nominal tile)."""
    if interpreting() or device.type != "cuda":
        return 1 if p <= 32 else 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(4 * sms, bsz * triton.cdiv(c, 128))
    return max(1, min(want, triton.cdiv(p, 64), 64))


def gelu_grn(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *, eps: float = EPS,
             split: int | None = None) -> torch.Tensor:
    """GRN(GELU(h)) for the NHWC Linear1 output ``h`` (B, H, W, C); ``gamma``/``beta`` hold C values
    (the module's (1, 1, 1, C) parameters). Returns a new tensor in h.dtype. ``split``: pass-1 split of H*W
    (default: sized to the GPU)."""
    check_tensor(h, "h", ndim=4)
    if not h.is_contiguous():
        raise ValueError(f"h must be a contiguous NHWC tensor (B, H, W, C), got strides {h.stride()} for shape "
                         f"{tuple(h.shape)}")
    bsz, hh, ww, c = h.shape
    for name, t in (("gamma", gamma), ("beta", beta)):
        check_tensor(t, name, device=h.device)
        if t.numel() != c or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor of C={c} values (e.g. shape (1, 1, 1, {c})), "
                             f"got shape {tuple(t.shape)}")
    p = hh * ww
    split = _default_split(bsz, p, c, h.device) if split is None else int(split)
    if not 1 <= split <= max(p, 1):
        raise ValueError(f"split must be in [1, H*W={p}], got {split}")
    rows = triton.cdiv(p, split)
    split = triton.cdiv(p, rows)  # no empty splits
    part = torch.empty((bsz, split, c), device=h.device, dtype=torch.float32)
    scale = torch.empty((bsz, c), device=h.device, dtype=torch.float32)
    out = torch.empty_like(h)
    _gelu_grn_stats_kernel[lambda m: (bsz, triton.cdiv(c, m["BLOCK_C"]), split)](h, part, p, c, rows, SPLIT=split)
    block = min(1024, triton.next_power_of_2(c)) if not interpreting() else min(64, triton.next_power_of_2(c))
    _gelu_grn_finalize_kernel[(bsz,)](part, gamma, scale, c, eps, SPLIT=split, BLOCK=block, num_warps=4)
    grid = lambda m: (bsz * triton.cdiv(p, m["BLOCK_P"]), triton.cdiv(c, m["BLOCK_C"]))  # noqa: E731
    _gelu_grn_apply_kernel[grid](h, scale, beta, out, p, c)
    return out
