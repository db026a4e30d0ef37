"""Stage A ResBlock parts (the VQGAN's own block, docs/reference.md §1.5), on NHWC activations.

``x = x + depthwise(LN1(x) * (1 + g0) + g1) * g2`` with ``depthwise = ReplicationPad2d(1) + Conv2d(c, c, 3,
groups=c)``; then ``x = x + channelwise(LN2(x) * (1 + g3) + g4) * g5`` (``g = gammas``, a (6,) parameter).
Two kernels:
  * ``layernorm_modulate``: ``LN_C(x) * (1 + g[i]) + g[i + 1]`` (no affine, eps 1e-6, fp32 stats); one program =
    BLOCK_P pixels x all channels. Without gammas it is the plain LayerNorm2d of Stage B/C (embedding, clf,
    scalers). R1W1.
  * ``dwconv_replicate_residual``: ``x + (dwconv3x3_replicate(h) + bias) * g[i]``; one program = a strip of
    BLOCK_W pixels x BLOCK_C channels of one row (no full-row constraint: no norm here). R2W1 (halo from L1/L2),
    against torch's pad copy, conv, mul, add.
The gammas are read on the device (no ``.item()``: no host sync, CUDA-graph safe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import cast_to, check_nhwc, check_shape, check_tensor, pick_configs, pruned

EPS = 1e-6


def layernorm_modulate_ref(x, gammas=None, index: int = 0, eps: float = EPS):
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return y if gammas is None else y * (1 + gammas[index]) + gammas[index + 1]


def dwconv_replicate_residual_ref(h, x, weight, bias, gammas, index: int = 2):
    c = h.shape[-1]
    y = F.conv2d(F.pad(h.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate"), weight, bias, groups=c)
    return x + y.permute(0, 2, 3, 1) * gammas[index]


def _ln_gpu_configs():
    """The full GPU autotune list (before ``_ln_keep`` prunes it per shape), also under the interpreter."""
    return [triton.Config({"BLOCK_P": bp}, num_warps=nw) for bp in (1, 2, 4, 8, 16, 32) for nw in (2, 4, 8)]


def _ln_configs():
    return pick_configs(_ln_gpu_configs(), triton.Config({"BLOCK_P": 32}, num_warps=4))


def _ln_keep(cfg, args) -> bool:
    return 8 <= cfg.kwargs["BLOCK_P"] * args["BLOCK_C"] // (32 * cfg.num_warps) <= 32


@triton.autotune(configs=_ln_configs(), key=["P", "C", "HAS_GAMMA"],
                 prune_configs_by={"early_config_prune": pruned(_ln_keep)})
@triton.jit
def _layernorm_modulate_kernel(x_ptr, g_ptr, out_ptr, P, C, eps, HAS_GAMMA: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    m = (offs_p < P)[:, None] & (offs_c < C)[None, :]
    offs = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(m, x - mean[:, None], 0.0)
    y = d * tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)[:, None]
    if HAS_GAMMA:
        y = y * (1.0 + tl.load(g_ptr).to(tl.float32)) + tl.load(g_ptr + 1).to(tl.float32)
    tl.store(out_ptr + offs, cast_to(y, out_ptr.dtype.element_ty), mask=m)


def _check_gammas(gammas, index, n, device):
    check_tensor(gammas, "gammas", ndim=1, device=device)
    if not 0 <= index <= gammas.numel() - n:
        raise ValueError(f"gammas index {index} out of range for {gammas.numel()} gammas (needs {n})")


def layernorm_modulate(x: torch.Tensor, gammas: torch.Tensor | None = None, index: int = 0, *,
                       eps: float = EPS) -> torch.Tensor:
    """``LN_C(x) * (1 + gammas[index]) + gammas[index + 1]`` (or plain ``LN_C(x)``) for NHWC ``x``."""
    check_nhwc(x)
    if gammas is not None:
        _check_gammas(gammas, index, 2, x.device)
    c = x.shape[-1]
    if c > 8192:
        raise ValueError(f"layernorm_modulate keeps a whole pixel's channels in registers; C={c} > 8192")
    p = x.numel() // max(c, 1)
    out = torch.empty_like(x)
    g = x if gammas is None else gammas[index:]
    _layernorm_modulate_kernel[lambda m: (triton.cdiv(p, m["BLOCK_P"]),)](
        x, g, out, p, c, eps, HAS_GAMMA=gammas is not None, BLOCK_C=triton.next_power_of_2(c))
    return out


def _conv_gpu_configs():
    """The full GPU autotune list (before ``_conv_keep`` prunes it per shape), also under the interpreter."""
    return [triton.Config({"BLOCK_W": bw, "BLOCK_C": bc}, num_warps=nw)
            for bw in (4, 8, 16, 32) for bc in (32, 64, 128) for nw in (2, 4, 8)]


def _conv_configs():
    return pick_configs(_conv_gpu_configs(), triton.Config({"BLOCK_W": 16, "BLOCK_C": 64}, num_warps=4))


def _conv_keep(cfg, args) -> bool:
    # 4..32 fp32 accumulators per thread; with fp32 input at most 16 (beyond that ptxas spills on sm_90)
    per_thread = cfg.kwargs["BLOCK_W"] * cfg.kwargs["BLOCK_C"] // (32 * cfg.num_warps)
    most = 16 if args["h_ptr"].element_size() >= 4 else 32
    return (4 <= per_thread <= most and cfg.kwargs["BLOCK_C"] <= max(32, triton.next_power_of_2(args["C"]))
            and cfg.kwargs["BLOCK_W"] <= max(4, triton.next_power_of_2(args["W"])))


@triton.autotune(configs=_conv_configs(), key=["H", "W", "C"],
                 prune_configs_by={"early_config_prune": pruned(_conv_keep)})
@triton.jit
def _dwconv_replicate_residual_kernel(h_ptr, x_ptr, w_ptr, b_ptr, g_ptr, out_ptr, H, W, C, swc, swy, swx,
                                      BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    b = row // H
    y = row % H
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m = (offs_w < W)[:, None] & cmask[None, :]
    img = b.to(tl.int64) * H * W * C
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for ky in tl.static_range(3):
        yy = tl.minimum(tl.maximum(y + ky - 1, 0), H - 1)  # replication padding = clamped indices
        for kx in tl.static_range(3):
            xx = tl.minimum(tl.maximum(offs_w + (kx - 1), 0), W - 1)
            hv = tl.load(h_ptr + img + (yy * W + xx)[:, None] * C + offs_c[None, :], mask=m, other=0.0)
            wv = tl.load(w_ptr + offs_c * swc + ky * swy + kx * swx, mask=cmask, other=0.0)
            acc += hv.to(tl.float32) * wv.to(tl.float32)[None, :]
    offs = img + (y * W + offs_w)[:, None] * C + offs_c[None, :]
    res = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    out = res + acc * tl.load(g_ptr).to(tl.float32)
    tl.store(out_ptr + offs, cast_to(out, out_ptr.dtype.element_ty), mask=m)


def dwconv_replicate_residual(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              gammas: torch.Tensor, index: int = 2) -> torch.Tensor:
    """``x + (conv3x3_depthwise(replication_pad(h)) + bias) * gammas[index]``, NHWC ``h`` and ``x`` (B, H, W, C);
    ``weight`` is the Conv2d weight (C, 1, 3, 3) (any strides), ``bias`` (C,)."""
    check_nhwc(h, "h")
    check_nhwc(x, "x")
    check_shape(x, "x (the residual)", h.shape)
    if x.dtype != h.dtype:
        raise TypeError(f"x has dtype {x.dtype} but h has {h.dtype}")
    bsz, hh, ww, c = h.shape
    check_tensor(weight, "weight", ndim=4, device=h.device)
    check_shape(weight, "weight (depthwise Conv2d weight)", (c, 1, 3, 3))
    check_tensor(bias, "bias", ndim=1, device=h.device)
    check_shape(bias, "bias", (c,))
    _check_gammas(gammas, index, 1, h.device)
    out = torch.empty_like(x)
    grid = lambda m: (bsz * hh, triton.cdiv(ww, m["BLOCK_W"]), triton.cdiv(c, m["BLOCK_C"]))  # noqa: E731
    _dwconv_replicate_residual_kernel[grid](h, x, weight, bias, gammas[index:], out, hh, ww, c,
                                            weight.stride(0), weight.stride(2), weight.stride(3))
    return out
