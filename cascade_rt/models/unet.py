"""The level structure shared by Stage C and Stage B (official `_down_encode` / `_up_decode`),
docs/reference.md §1.3-§1.4.

`CascadeUNet` builds `down_blocks`, `down_downscalers`, `down_repeat_mappers`, `up_blocks`, `up_upscalers`,
`up_repeat_mappers` exactly as the official classes do, and runs them. Subclasses supply the scalers, the
embedding/classifier and the conditioning. The per-step entry point is `denoise(x, r, cond_kv, ...)`, where
`cond_kv` holds the precomputed key/value projections of the conditioning tokens for every AttnBlock
(`attn_blocks()` order): the step-invariant work has already left the step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cascade_rt.models.common import (
    AttnBlock,
    FeedForwardBlock,
    ResBlock,
    TimestepBlock,
    gen_r_embedding,
    interpolate_fp32,
)

CondKV = Sequence[tuple[torch.Tensor, torch.Tensor]]


class CascadeUNet(nn.Module):
    """Common machinery; not instantiated directly (see `StageC`, `StageB`)."""

    c_r: int
    t_conds: list[str]

    def _build_levels(
        self,
        *,
        c_hidden: Sequence[int],
        c_cond: int,
        nhead: Sequence[int],
        blocks: Sequence[Sequence[int]],
        block_repeat: Sequence[Sequence[int]],
        level_config: Sequence[str],
        kernel_size: int,
        dropout: Sequence[float],
        self_attn: bool,
        downscaler: Callable[[int], nn.Module],
        upscaler: Callable[[int], nn.Module],
    ) -> None:
        def get_block(kind: str, level: int, c_skip: int = 0) -> nn.Module:
            c, p = c_hidden[level], dropout[level]
            if kind == "C":
                return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=p)
            if kind == "A":
                return AttnBlock(c, c_cond, nhead[level], self_attn=self_attn, dropout=p)
            if kind == "F":
                return FeedForwardBlock(c, dropout=p)
            if kind == "T":
                return TimestepBlock(c, self.c_r, conds=self.t_conds)
            raise ValueError(f"unknown block type {kind!r} in level_config (expected letters from 'CTAF')")

        levels = len(c_hidden)
        self.down_blocks, self.down_downscalers, self.down_repeat_mappers = (
            nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        )
        for i in range(levels):
            self.down_downscalers.append(downscaler(i) if i > 0 else nn.Identity())
            self.down_blocks.append(
                nn.ModuleList(get_block(kind, i) for _ in range(blocks[0][i]) for kind in level_config[i])
            )
            self.down_repeat_mappers.append(
                nn.ModuleList(nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(block_repeat[0][i] - 1))
            )
        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            self.up_upscalers.append(upscaler(i) if i > 0 else nn.Identity())
            up_block = nn.ModuleList()
            for j in range(blocks[1][::-1][i]):
                for k, kind in enumerate(level_config[i]):
                    c_skip = c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    up_block.append(get_block(kind, i, c_skip))
            self.up_blocks.append(up_block)
            self.up_repeat_mappers.append(
                nn.ModuleList(
                    nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(block_repeat[1][::-1][i] - 1)
                )
            )

    # ---------------------------------------------------------------- conditioning split
    def attn_blocks(self) -> list[AttnBlock]:
        """Every AttnBlock once, down levels then up levels: the order of `cond_kv`."""
        return [m for group in (*self.down_blocks, *self.up_blocks) for m in group if isinstance(m, AttnBlock)]

    def precompute_cond_kv(self, clip: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.cond_kv(clip) for block in self.attn_blocks()]

    def r_embedding(self, r: torch.Tensor, t_cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """fp32 (B, c_r * (1 + len(t_conds))); absent t_conds (`sca`, `crp`) embed r=0, as official."""
        t_cond = t_cond or {}
        embeds = [gen_r_embedding(r, self.c_r)]
        for name in self.t_conds:
            embeds.append(gen_r_embedding(t_cond.get(name, torch.zeros_like(r)), self.c_r))
        return torch.cat(embeds, dim=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding[1].weight.dtype

    # ---------------------------------------------------------------- per-step work
    def _run_block(self, block: nn.Module, x: torch.Tensor, r_embed, kv, skip=None, cnet=None) -> torch.Tensor:
        if isinstance(block, ResBlock):
            if cnet is not None:  # ControlNet (official ControlNetDeliverer): one list entry per ResBlock call
                control = cnet()
                if control is not None:
                    x = x + interpolate_fp32(control, x.shape[-2:], x.dtype)
            return block(x, skip)
        if isinstance(block, AttnBlock):
            return block.attend(x, *kv[id(block)])
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)

    def _down_encode(self, x: torch.Tensor, r_embed: torch.Tensor, kv, cnet=None) -> list[torch.Tensor]:
        level_outputs = []
        for down_block, downscaler, repmap in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = downscaler(x)
            for i in range(len(repmap) + 1):
                for block in down_block:
                    x = self._run_block(block, x, r_embed, kv, cnet=cnet)
                if i < len(repmap):
                    x = repmap[i](x)
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(self, level_outputs: list[torch.Tensor], r_embed: torch.Tensor, kv, cnet=None) -> torch.Tensor:
        x = level_outputs[0]
        levels = zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)
        for i, (up_block, upscaler, repmap) in enumerate(levels):
            for j in range(len(repmap) + 1):
                for k, block in enumerate(up_block):
                    skip = level_outputs[i] if isinstance(block, ResBlock) and k == 0 and i > 0 else None
                    if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                        x = interpolate_fp32(x, skip.shape[-2:], x.dtype)
                    x = self._run_block(block, x, r_embed, kv, skip, cnet)
                if j < len(repmap):
                    x = repmap[j](x)
            x = upscaler(x)
        return x

    def _run_levels(self, x: torch.Tensor, r: torch.Tensor, cond_kv: CondKV, t_cond, cnet=None) -> torch.Tensor:
        """`cnet`: the official ControlNet list (entry i goes to the i-th ResBlock call; None: nothing), or None."""
        blocks = self.attn_blocks()
        if len(cond_kv) != len(blocks):
            raise ValueError(f"cond_kv has {len(cond_kv)} entries, the model has {len(blocks)} attention blocks")
        kv = {id(block): pair for block, pair in zip(blocks, cond_kv)}
        r_embed = self.r_embedding(r, t_cond)
        deliver = Deliverer(cnet) if cnet is not None else None
        return self._up_decode(self._down_encode(x, r_embed, kv, deliver), r_embed, kv, deliver)


class Deliverer:
    """Official `ControlNetDeliverer`: hands out the list's entries one call at a time, then None."""

    def __init__(self, projections: Sequence[torch.Tensor | None]) -> None:
        self.projections, self.idx = list(projections), 0

    def __call__(self) -> torch.Tensor | None:
        out = self.projections[self.idx] if self.idx < len(self.projections) else None
        self.idx += 1
        return out
