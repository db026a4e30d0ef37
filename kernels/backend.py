"""The ``triton`` backend: Stage A/B/C blocks swapped for kernel-backed versions of themselves.

``apply_triton_kernels(model)`` changes the class of every ``ResBlock``, ``AttnBlock``, ``TimestepBlock``,
``LayerNorm2d`` and Stage A ``StageAResBlock`` inside ``model`` to a subclass whose ``forward`` calls the
kernels of this package. The modules stay the same objects: same parameters (the very same ``Parameter``
objects), same state-dict keys, same ``id()`` (the stage's ``cond_kv`` lookup is keyed by it), and
``isinstance`` checks still hold. ``remove_triton_kernels(model)`` restores the eager classes (the slow twin).

Layout: every kernel-backed block takes an NCHW-shaped tensor, works on its NHWC view and returns an
NCHW-shaped tensor with ``torch.channels_last`` memory, so ``x.permute(0, 2, 3, 1)`` is free for the next block
and the convolutions / interpolations between blocks keep channels_last. (The first block converts a plain NCHW
input once; ``clf`` / ``out_block`` hand back contiguous NCHW.)

Fusions (see each kernel's docstring for the byte counts):
  ResBlock       dwconv3x3 + LayerNorm2d in one kernel (skip written into the same buffer), Linear1 (cuBLAS),
                 GELU+GRN (stats, finalize, apply), Linear2 (cuBLAS, bias epilogue), residual add.
  TimestepBlock  x * (1 + a) + b in one pass; when the next block in its ModuleList is an AttnBlock, the same
                 pass also writes LayerNorm(z), handed to that AttnBlock (its norm disappears).
  AttnBlock      [norm], fused QKV Linear, two-source flash attention (image K/V from the QKV buffer,
                 conditioning K/V from ``cond_kv``, no concat), out_proj, residual add.
  Stage A        LN1 + gammas, replicate-padded dwconv + bias * g2 + residual, LN2 + gammas, MLP, addcmul.
Not fused (needs a hook in the model code): the ResBlock's residual add with the following TimestepBlock's
modulation; ``_run_block`` would have to hand the ResBlock the r embedding (or call a fused C+T pair).

CUDA graphs: no host syncs, no ``.item()``; per-call host work is shape checks and a weight-cache lookup. The
autotuner benchmarks each kernel the first time it sees a shape, and the depthwise weights are re-laid out
once: run ``warmup`` (or any forward at every shape) before capture.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cascade_rt.models.common import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock
from cascade_rt.models.stage_a import StageAResBlock

from .attention import attention
from .dwconv_layernorm import dwconv_layernorm
from .gelu_grn import gelu_grn
from .modulation import modulation
from .stage_a_block import dwconv_replicate_residual, layernorm_modulate


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); free when x is channels_last."""
    xp = x.permute(0, 2, 3, 1)
    return xp if xp.is_contiguous() else xp.contiguous()


def _nchw(xh: torch.Tensor) -> torch.Tensor:
    return xh.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


def _channel_last_weight(module: nn.Module, conv: nn.Conv2d) -> torch.Tensor:
    """The depthwise weight (C, 1, 3, 3) as a channel-last view (coalesced loads), cached per weight version."""
    w = conv.weight
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cache = module.__dict__.get("_triton_dw_cache")
    if cache is None or cache[0] != key:
        cache = (key, w.detach().permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2))
        module.__dict__["_triton_dw_cache"] = cache
    return cache[1]


class _Handoff:
    """A one-slot mailbox from a TimestepBlock to the AttnBlock after it: LayerNorm(z) keyed by z itself."""

    __slots__ = ("key", "norm")

    def __init__(self) -> None:
        self.key = self.norm = None

    def take(self, x: torch.Tensor) -> torch.Tensor | None:
        norm, hit = self.norm, self.key is x
        self.key = self.norm = None
        return norm if hit else None


class TritonLayerNorm2d(LayerNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None or x.dim() != 4:
            return super().forward(x)
        return _nchw(layernorm_modulate(_nhwc(x), eps=self.eps))


class TritonResBlock(ResBlock):
    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.training or self.depthwise.kernel_size != (3, 3):
            return super().forward(x, x_skip)
        xh = _nhwc(x)
        w = _channel_last_weight(self, self.depthwise)
        if x_skip is None:
            h = dwconv_layernorm(xh, w, self.depthwise.bias)
        else:  # LN output and skip side by side in one NHWC buffer: the concat is two writes, no copy
            sk = _nhwc(x_skip.to(x.dtype))
            h = xh.new_empty((*xh.shape[:3], xh.shape[3] + sk.shape[3]))
            dwconv_layernorm(xh, w, self.depthwise.bias, out=h[..., : xh.shape[3]])
            h[..., xh.shape[3]:].copy_(sk)
        lin1, grn, lin2 = self.channelwise[0], self.channelwise[2], self.channelwise[4]
        h = gelu_grn(F.linear(h, lin1.weight, lin1.bias), grn.gamma, grn.beta)
        return _nchw(torch.add(xh, F.linear(h, lin2.weight, lin2.bias)))


class TritonTimestepBlock(TimestepBlock):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.modulation(t)  # (B, C, 1, 1) column views of one (B, 2C) tensor
        a, b = a[:, :, 0, 0], b[:, :, 0, 0]
        handoff = self.__dict__.get("_triton_handoff")
        if handoff is None:
            return _nchw(modulation(_nhwc(x), a, b))
        z, norm = modulation(_nhwc(x), a, b, return_norm=True)
        out = _nchw(z)
        handoff.key, handoff.norm = out, norm
        return out


class TritonAttnBlock(AttnBlock):
    def attend(self, x: torch.Tensor, k_cond: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
        handoff = self.__dict__.get("_triton_handoff")
        norm = handoff.take(x) if handoff is not None else None
        if self.training or not self.self_attn:
            return super().attend(x, k_cond, v_cond)
        mha = self.attention.attn
        xh = _nhwc(x)
        bsz, h, w, c = xh.shape
        if norm is None:
            norm = layernorm_modulate(xh, eps=self.norm.eps)
        qkv = F.linear(norm.view(bsz, h * w, c), mha.in_proj_weight, mha.in_proj_bias)
        o = attention(qkv, self.nhead, k_cond.to(qkv.dtype), v_cond.to(qkv.dtype))
        out = F.linear(o, mha.out_proj.weight, mha.out_proj.bias)
        return _nchw(torch.add(xh, out.view(bsz, h, w, c)))


class TritonStageAResBlock(StageAResBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        g = self.gammas if self.gammas.dtype == x.dtype else self.gammas.to(x.dtype)
        xh = _nhwc(x)
        conv = self.depthwise[1]
        h = layernorm_modulate(xh, g, 0, eps=self.norm1.eps)
        xh = dwconv_replicate_residual(h, xh, _channel_last_weight(self, conv), conv.bias, g, 2)
        h = layernorm_modulate(xh, g, 3, eps=self.norm2.eps)
        lin1, lin2 = self.channelwise[0], self.channelwise[2]
        h = F.linear(F.gelu(F.linear(h, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
        return _nchw(torch.addcmul(xh, h, g[5]))


SWAPS: dict[type, type] = {
    ResBlock: TritonResBlock,
    AttnBlock: TritonAttnBlock,
    TimestepBlock: TritonTimestepBlock,
    LayerNorm2d: TritonLayerNorm2d,
    StageAResBlock: TritonStageAResBlock,
}
_UNSWAP = {v: k for k, v in SWAPS.items()}


def _contiguous_output(module, args, out):
    return out.contiguous() if isinstance(out, torch.Tensor) else out


def apply_triton_kernels(model: nn.Module) -> nn.Module:
    """Swap the kernel-backed blocks into ``model`` in place (idempotent) and return it."""
    for m in model.modules():
        if type(m) in SWAPS:  # exact type: subclasses someone else wrote are left alone
            m.__class__ = SWAPS[type(m)]
    for m in model.modules():  # TimestepBlock -> AttnBlock pairs within one block list share a handoff
        if isinstance(m, nn.ModuleList):
            for prev, nxt in zip(m, list(m)[1:]):
                if isinstance(prev, TritonTimestepBlock) and isinstance(nxt, TritonAttnBlock):
                    prev.__dict__["_triton_handoff"] = nxt.__dict__["_triton_handoff"] = _Handoff()
    for name in ("clf", "out_block"):  # hand back plain contiguous NCHW outputs
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and _contiguous_output not in head._forward_hooks.values():
            head.register_forward_hook(_contiguous_output)
    return model


def remove_triton_kernels(model: nn.Module) -> nn.Module:
    """Undo ``apply_triton_kernels``: the eager classes again, same parameters."""
    for m in model.modules():
        if type(m) in _UNSWAP:
            m.__class__ = _UNSWAP[type(m)]
        for key in ("_triton_handoff", "_triton_dw_cache"):
            m.__dict__.pop(key, None)
        for key, hook in list(m._forward_hooks.items()):
            if hook is _contiguous_output:
                del m._forward_hooks[key]
    return model


@torch.no_grad()
def warmup(fn, *args, runs: int = 2, **kwargs):
    """Call ``fn(*args, **kwargs)`` ``runs`` times (autotuning and weight caches happen here, not in a CUDA-graph
    capture) and wait for the device. Returns the last output."""
    out = None
    for _ in range(runs):
        out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out
