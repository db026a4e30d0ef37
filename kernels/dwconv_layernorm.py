"""Depthwise 3x3 conv (zero padding 1, bias) fused with LayerNorm over C: the first half of Stage B/C's ResBlock.

``ResBlock``: ``h = LayerNorm2d(depthwise(x))`` (no affine, eps 1e-6). On an NHWC activation one program owns
``BLOCK_P`` consecutive pixels (row-major over B, H, W) and ALL channels (``BLOCK_C = next_pow2(C)``): it accumulates
the 9 taps in fp32 registers, then takes the LayerNorm statistics of the finished conv output without it ever leaving
the SM (two-pass mean / variance over registers, exact). DRAM traffic is one read of x (the 3x3 halo is served
from L1/L2) and one write of the output: 2 * B*H*W*C * itemsize bytes, against torch's conv (R+W), two permute
copies and a LayerNorm (R+W).

The output can be a channel slice of a wider NHWC buffer (``out=buf[..., :C]``) so that ResBlock's skip
concatenation is written in place. The weight is read through its strides: pass the Conv2d weight (C, 1, 3, 3)
as is, or a channel-last view of it (``w.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)``) for coalesced
loads on the GPU (the triton backend does that once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import cast_to, check_nhwc, check_shape, check_tensor, pick_configs, pruned

EPS = 1e-6


def dwconv_layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Plain torch: NHWC x -> conv2d(groups=C, padding=1) -> LayerNorm over C (stats in fp32) -> x.dtype, NHWC."""
    c = x.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1, groups=c).permute(0, 2, 3, 1)
    return F.layer_norm(y.float(), (c,), eps=eps).to(x.dtype)


def _gpu_configs():
    """The full GPU autotune list (before ``_keep`` prunes it per shape), also under the interpreter."""
    return [triton.Config({"BLOCK_P": bp}, num_warps=nw) for bp in (1, 2, 4, 8, 16, 32) for nw in (4, 8, 16)]


def _configs():
    return pick_configs(_gpu_configs(), triton.Config({"BLOCK_P": 64}, num_warps=4))


def _keep(cfg, args) -> bool:
    # Tile = BLOCK_P pixels x BLOCK_C channels of fp32 accumulators. What ptxas (sm_90) compiles without spilling:
    # fp32 input: exactly 16 values per thread on at most 8 warps (the 9 taps' fp32 loads are in flight together);
    # bf16/fp16: 16..64 per thread, 16..32 on 16 warps (which cap a thread at 128 registers). docs/kernels.md.
    per_thread = cfg.kwargs["BLOCK_P"] * args["BLOCK_C"] // (32 * cfg.num_warps)
    if args["x_ptr"].element_size() >= 4:
        return per_thread == 16 and cfg.num_warps <= 8
    return 16 <= per_thread <= (32 if cfg.num_warps == 16 else 64)


@triton.autotune(configs=_configs(), key=["H", "W", "C"], prune_configs_by={"early_config_prune": pruned(_keep)})
@triton.jit
def _dwconv_layernorm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, NPIX, H, W, C, swc, swy, swx, out_pstride, eps,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # BLOCK_P consecutive pixels of the flattened (B, H, W) grid (mostly one image row) x all channels
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    pmask = offs_p < NPIX
    w_idx = offs_p % W
    h_idx = (offs_p // W) % H

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for ky in tl.static_range(3):
        row_ok = pmask & (h_idx + (ky - 1) >= 0) & (h_idx + (ky - 1) < H)
        for kx in tl.static_range(3):
            m = row_ok & (w_idx + (kx - 1) >= 0) & (w_idx + (kx - 1) < W)
            src = (offs_p + ((ky - 1) * W + (kx - 1))).to(tl.int64) * C  # neighbour pixel, same image
            xv = tl.load(x_ptr + src[:, None] + offs_c[None, :], mask=m[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(w_ptr + offs_c * swc + ky * swy + kx * swx, mask=cmask, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    mean = tl.sum(acc, axis=1) / C  # masked channels hold exactly 0 (zero bias, zero taps)
    d = tl.where(cmask[None, :], acc - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    y = d * tl.rsqrt(var + eps)[:, None]
    out = out_ptr + offs_p.to(tl.int64)[:, None] * out_pstride + offs_c[None, :]
    tl.store(out, cast_to(y, out_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


def dwconv_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = EPS,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm_C(depthwise_conv3x3(x) + bias) for an NHWC activation ``x`` (B, H, W, C); output in x.dtype.

    ``weight``: the depthwise Conv2d weight (C, 1, 3, 3) (any strides); ``bias``: (C,).
    ``out``: optional (B, H, W, C) destination with unit channel stride, e.g. ``buf[..., :C]`` of a wider buffer.
    """
    check_nhwc(x)
    bsz, h, w, c = x.shape
    check_tensor(weight, "weight", ndim=4, device=x.device)
    check_shape(weight, "weight (depthwise Conv2d weight)", (c, 1, 3, 3))
    check_tensor(bias, "bias", ndim=1, device=x.device)
    check_shape(bias, "bias", (c,))
    if out is None:
        out = torch.empty_like(x)
    else:
        check_tensor(out, "out", ndim=4, dtypes=(x.dtype,), device=x.device)
        check_shape(out, "out", x.shape)
        ps = out.stride(2)
        if out.stride() != (h * w * ps, w * ps, ps, 1):
            raise ValueError(f"out must be an NHWC buffer or a channel slice of one (strides (H*W*P, W*P, P, 1)), "
                             f"got strides {out.stride()}")
    if c > 8192:
        raise ValueError(f"dwconv_layernorm keeps a whole pixel's channels in registers; C={c} > 8192 is unsupported")
    block_c = triton.next_power_of_2(c)
    npix = bsz * h * w
    _dwconv_layernorm_kernel[lambda meta: (triton.cdiv(npix, meta["BLOCK_P"]),)](
        x, weight, bias, out, npix, h, w, c, weight.stride(0), weight.stride(2), weight.stride(3), out.stride(2),
        eps, BLOCK_C=block_c)
    return out
