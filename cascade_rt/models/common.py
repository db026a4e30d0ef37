"""Building blocks shared by Stage B and Stage C (official `modules/common.py`), docs/reference.md §1.1.

Attribute names equal the official checkpoint keys. The models run in bf16 or fp32 *without* autocast:
normalisation statistics are computed in fp32 and cast back to the activation dtype, the r embedding is fp32,
and wherever the official code calls `.float()` (relying on autocast afterwards) we cast back explicitly.

Attention keeps `nn.MultiheadAttention` as the parameter container (keys `attention.attn.in_proj_weight`, ...)
but computes with `scaled_dot_product_attention`, split so that the key/value projections of the
(step-invariant) conditioning tokens can be computed once per prompt: `AttnBlock.cond_kv()` +
`AttnBlock.attend()`; `AttnBlock.forward(x, kv)` is exactly the official block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (stats in fp32, output in the input dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(
            x.permute(0, 2, 3, 1).float(),
            self.normalized_shape,
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            self.eps,
        )
        return y.to(x.dtype).permute(0, 3, 1, 2)


def layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Apply an affine-free `nn.LayerNorm` with fp32 statistics, returning the input dtype."""
    return F.layer_norm(x.float(), norm.normalized_shape, None, None, norm.eps).to(x.dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC tensors: per-sample, per-channel L2 over H, W divided by its channel mean."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x.float(), p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return (self.gamma * (x * nx.to(x.dtype)) + self.beta + x).to(x.dtype)


class ResBlock(nn.Module):
    """depthwise 3x3 -> LayerNorm2d -> [cat skip] -> Linear(4c) -> GELU -> GRN -> Dropout -> Linear(c) -> + x."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        x_res = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip.to(x.dtype)], dim=1)
        x = self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + x_res


class Attention2D(nn.Module):
    """Holds the official `nn.MultiheadAttention` parameters; the math is done by `AttnBlock`."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(c, nhead, dropout=dropout, bias=True, batch_first=True)


class AttnBlock(nn.Module):
    """x + MHA(query=norm(x), keys/values=[norm(x) tokens ; kv_mapper(cond)]) (official `self_attn=True`)."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.nhead = nhead
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def cond_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key/value projections (B, S, c) of the conditioning tokens. Step-invariant: once per prompt."""
        c = self.attention.attn.embed_dim
        w, b = self.attention.attn.in_proj_weight, self.attention.attn.in_proj_bias
        kv = self.kv_mapper(kv.to(w.dtype))
        return F.linear(kv, w[c : 2 * c], b[c : 2 * c]), F.linear(kv, w[2 * c :], b[2 * c :])

    def attend(self, x: torch.Tensor, k_cond: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
        """The per-step part: attention of the normed image tokens over [image tokens ; conditioning]."""
        mha = self.attention.attn
        bsz, c, h, w = x.shape
        tokens = self.norm(x).view(bsz, c, h * w).permute(0, 2, 1)
        if self.self_attn:
            q, k, v = F.linear(tokens, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            k, v = torch.cat([k, k_cond], dim=1), torch.cat([v, v_cond], dim=1)
        else:
            q = F.linear(tokens, mha.in_proj_weight[:c], mha.in_proj_bias[:c])
            k, v = k_cond, v_cond
        heads = lambda t: t.unflatten(-1, (self.nhead, c // self.nhead)).transpose(1, 2)  # noqa: E731
        dropout = mha.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), dropout_p=dropout)
        out = mha.out_proj(out.transpose(1, 2).flatten(2))
        return x + out.permute(0, 2, 1).reshape(bsz, c, h, w)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.cond_kv(kv))


class FeedForwardBlock(nn.Module):
    """Official 'F' block (unused by the released configs): LayerNorm2d + the ResBlock MLP, residual."""

    def __init__(self, c: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """x * (1 + a) + b with (a, b) = mapper(r_embed) + sum of mapper_<cond>(cond embeds)."""

    def __init__(self, c: int, c_timestep: int, conds: list[str] | tuple[str, ...] = ("sca",)) -> None:
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for cname in self.conds:
            setattr(self, f"mapper_{cname}", nn.Linear(c_timestep, c * 2))

    def modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (B, c, 1, 1), from the (B, c_r * (1 + len(conds))) r embedding."""
        t = t.to(self.mapper.weight.dtype).chunk(len(self.conds) + 1, dim=1)
        ab = self.mapper(t[0])
        for i, cname in enumerate(self.conds):
            ab = ab + getattr(self, f"mapper_{cname}")(t[i + 1])
        a, b = ab[:, :, None, None].chunk(2, dim=1)
        return a, b

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.modulation(t)
        return x * (1 + a) + b


class UpDownBlock2d(nn.Module):
    """Stage C level change: [bilinear x2 | x0.5 if enabled] and a 1x1 conv (official casts to fp32 first)."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}")
        interpolation = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([interpolation, mapping] if mode == "up" else [mapping, interpolation])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        for block in self.blocks:
            if isinstance(block, nn.Identity):
                continue
            # official: block(x.float()) under autocast; here interpolation in fp32, the conv in the weight dtype
            x = block(x.float()) if isinstance(block, nn.Upsample) else block(x.to(block.weight.dtype))
        return x.to(dtype)


def gen_r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise level r in [0, 1] -> (B, c_r), always fp32 (docs/reference.md §1.2)."""
    r = r.float() * max_positions
    half_dim = c_r // 2
    k = math.log(max_positions) / (half_dim - 1)
    freqs = torch.arange(half_dim, device=r.device).float().mul(-k).exp()
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb


def interpolate_fp32(x: torch.Tensor, size: tuple[int, int] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Official `interpolate(x.float(), size, bilinear, align_corners=True)`, cast to `dtype` afterwards."""
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True).to(dtype)
