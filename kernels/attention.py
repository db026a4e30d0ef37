"""Flash-style attention for AttnBlock: image-token queries over [image-token keys ‖ conditioning keys].

``AttnBlock`` runs ``MultiheadAttention(query=n, key=cat([n, cond]), value=cat([n, cond]))`` with
``n = LN(x)`` as tokens. Its fused in-projection of ``n`` gives a (B, N, 3C) buffer ``q | k | v``; the
conditioning keys/values are step-invariant (B, S, C) tensors (``AttnBlock.cond_kv``). This kernel reads q, k, v
straight out of the QKV buffer (no split, no head transpose) and walks the key sequence in two segments — the
N image keys, then the S conditioning keys (masked tail, S = 85 for Stage C, 4 for Stage B) — so the
concatenation is never materialised. Online softmax in exp2 with fp32 running max / sum / accumulator; P is
cast to the input dtype for the PV product (as in FlashAttention-2). Output (B, N, C), heads side by side,
ready for out_proj. One program = BLOCK_M queries of one (sample, head). head_dim is a constexpr: 64 in
every released model (32..128 powers of two run unmasked; other sizes, e.g. the tiny presets', are padded).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cast_to, check_tensor, dot, pick_configs, pruned


def attention_ref(qkv: torch.Tensor, heads: int, cond_k: torch.Tensor | None = None,
                  cond_v: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Plain torch (explicit softmax(q k^T * scale) v in the input dtype) on the fused (B, N, 3C) QKV layout."""
    bsz, n, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    q, k, v = qkv.split(c, dim=-1)
    if cond_k is not None:
        k, v = torch.cat([k, cond_k], dim=1), torch.cat([v, cond_v], dim=1)
    q, k, v = (t.reshape(bsz, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax((q @ k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(d)), dim=-1)
    return (attn @ v).transpose(1, 2).reshape(bsz, n, c)


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, s_kn, s_vn, start, end, qk_scale, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * s_kn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * s_vn + offs_d[None, :]
        if MASKED or BLOCK_D != HEAD_DIM:
            kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < end) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < end) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        qk = dot(q, kt, tl.zeros((q.shape[0], BLOCK_N), tl.float32), PRECISION) * qk_scale  # log2 domain
        if MASKED:
            qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot(cast_to(p, v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, m_i, l_i


def _gpu_configs():
    """The full GPU autotune list (before ``_keep`` prunes it per shape), also under the interpreter."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
            for bm in (32, 64, 128) for bn in (32, 64, 128) for nw in (4, 8) for ns in (2, 3, 4)]


def _configs():
    return pick_configs(_gpu_configs(), triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1))


# fp32 ("ieee") dots run on FMA units with the score tile in registers: ptxas (sm_90) spills as soon as a tile
# holds more than 8 scores per thread (BLOCK_M x BLOCK_N or BLOCK_S), e.g. 64x64 on 4 warps; fewer leave
# registers idle. docs/kernels.md.
IEEE_SCORES_PER_THREAD = 8
IEEE_BLOCK_S = 32  # the conditioning tile of fp32 launches (64 for bf16/fp16)


def _keep(cfg, args) -> bool:
    bm, bn, d = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], args["BLOCK_D"]
    ieee = args["PRECISION"] == "ieee"
    itemsize = 4 if ieee else 2
    smem = cfg.num_stages * 2 * bn * d * itemsize + bm * d * itemsize  # pipelined K, V tiles + Q
    if smem > 180 * 1024 or bn > max(32, triton.next_power_of_2(args["N"])):
        return False
    if ieee:  # fp32: exactly 8 scores per thread, e.g. 64x32 tiles on 8 warps or 32x32 on 4
        return bm * max(bn, args["BLOCK_S"]) == IEEE_SCORES_PER_THREAD * 32 * cfg.num_warps
    return (bm == 64 or (bm == 128 and cfg.num_warps == 8 and args["N"] >= 512)  # 128-row tiles only when many
            and not (bm == 64 and cfg.num_warps == 8 and d <= 64))


@triton.autotune(configs=_configs(), key=["N", "S", "HEAD_DIM", "PRECISION"],
                 prune_configs_by={"early_config_prune": pruned(_keep)})
@triton.jit
def _attention_kernel(qkv_ptr, ck_ptr, cv_ptr, o_ptr, N, S, heads, C,
                      s_xb, s_xn, s_ckb, s_ckn, s_cvb, s_cvn, s_ob, s_on, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    col = (bh % heads) * HEAD_DIM
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < N
    dmask = offs_d < HEAD_DIM
    x_base = qkv_ptr + b * s_xb + col
    q = tl.load(x_base + offs_m[:, None] * s_xn + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    # image keys/values: columns C + col and 2C + col of the QKV buffer; whole blocks, then the masked tail
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, x_base + C, x_base + 2 * C, s_xn, s_xn, 0, n_full, qk_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION)
    if n_full < N:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, x_base + C, x_base + 2 * C, s_xn, s_xn, n_full, N, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION)
    # conditioning keys/values, their own (small) blocks
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, ck_ptr + b * s_ckb + col, cv_ptr + b * s_cvb + col, s_ckn, s_cvn,
                            0, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_S, True, PRECISION)
    out = acc / l_i[:, None]
    o = o_ptr + b * s_ob + col + offs_m[:, None] * s_on + offs_d[None, :]
    tl.store(o, cast_to(out, o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def attention(qkv: torch.Tensor, heads: int, cond_k: torch.Tensor | None = None,
              cond_v: torch.Tensor | None = None, *, scale: float | None = None) -> torch.Tensor:
    """softmax(q [k; cond_k]^T * scale) [v; cond_v] per head.

    ``qkv``: (B, N, 3C) with unit channel stride, columns q | k | v (the fused in-projection output);
    ``cond_k``, ``cond_v``: (B, S, C) with unit channel stride, or both None; ``heads``: head_dim = C / heads
    up to 128 (64 in every released model; other sizes are padded to a power of two >= 16 and masked).
    ``scale`` defaults to 1/sqrt(head_dim). Returns (B, N, C) in qkv.dtype.
    """
    check_tensor(qkv, "qkv", ndim=3)
    bsz, n, c3 = qkv.shape
    if c3 % 3 or qkv.stride(2) != 1:
        raise ValueError(f"qkv must be (B, N, 3C) with unit channel stride (the fused QKV projection output), got "
                         f"shape {tuple(qkv.shape)}, strides {qkv.stride()}")
    c = c3 // 3
    if not isinstance(heads, int) or heads <= 0 or c % heads:
        raise ValueError(f"heads={heads!r} must be a positive int dividing C={c}")
    d = c // heads
    if not 1 <= d <= 128:
        raise ValueError(f"head_dim C/heads = {d} unsupported: must be <= 128")
    if (cond_k is None) != (cond_v is None):
        raise ValueError("pass both cond_k and cond_v, or neither")
    if cond_k is None:
        cond_k = cond_v = qkv.new_empty((bsz, 0, c))
    for name, t in (("cond_k", cond_k), ("cond_v", cond_v)):
        check_tensor(t, name, ndim=3, dtypes=(qkv.dtype,), device=qkv.device)
        if t.shape[0] != bsz or t.shape[2] != c or t.stride(2) != 1:
            raise ValueError(f"{name} must be (B={bsz}, S, C={c}) with unit channel stride, got shape "
                             f"{tuple(t.shape)}, strides {t.stride()}")
    s = cond_k.shape[1]
    if cond_v.shape[1] != s:
        raise ValueError(f"cond_k has {s} tokens but cond_v has {cond_v.shape[1]}")
    out = torch.empty((bsz, n, c), device=qkv.device, dtype=qkv.dtype)
    if n == 0:
        return out
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(d)) * 1.4426950408889634  # * log2(e)
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"  # fp32 stays exact; bf16 ignores it
    block_s = min(IEEE_BLOCK_S if precision == "ieee" else 64, max(16, triton.next_power_of_2(max(s, 1))))
    grid = lambda m: (triton.cdiv(n, m["BLOCK_M"]), bsz * heads)  # noqa: E731
    _attention_kernel[grid](qkv, cond_k, cond_v, out, n, s, heads, c,
                            qkv.stride(0), qkv.stride(1), cond_k.stride(0), cond_k.stride(1),
                            cond_v.stride(0), cond_v.stride(1), out.stride(0), out.stride(1), qk_scale,
                            HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_S=block_s,
                            PRECISION=precision)
    return out
