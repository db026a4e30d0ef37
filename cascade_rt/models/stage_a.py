"""Stage A, the VQGAN between pixels and the 4-channel Stage B latent (official `modules/stage_a.py`),
docs/reference.md §1.5.

`decode(x)` multiplies by `scale_factor` (0.43, official) internally; the codebook (`vquantizer`) is kept for
strict loading and for `encode(..., quantize=True)`, but the decode path never uses it.
Pixels are RGB in [0, 1], unnormalised. Runs in bf16 or fp32 without autocast (LayerNorm stats in fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from cascade_rt.models.common import layer_norm_fp32


class StageAResBlock(nn.Module):
    """Official Stage A `ResBlock(c, c_hidden)`: two gamma-modulated LayerNorm branches, replication padding."""

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6), requires_grad=True)

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_fp32(norm, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas.to(x.dtype)
        x = x + self.depthwise(self._norm(self.norm1, x) * (1 + g[0]) + g[1]) * g[2]
        h = self._norm(self.norm2, x) * (1 + g[3]) + g[4]
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g[5]


class VectorQuantize(nn.Module):
    """Nearest-codebook quantiser; only the key `codebook.weight` (k, c) exists in the checkpoint."""

    def __init__(self, embedding_size: int, k: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.permute(0, 2, 3, 1).reshape(-1, x.size(1))
        idx = torch.cdist(flat.float(), self.codebook.weight.float()).argmin(dim=1)
        qx = self.codebook(idx).view(x.size(0), x.size(2), x.size(3), x.size(1)).permute(0, 3, 1, 2)
        return qx.to(x.dtype), idx.view(x.size(0), x.size(2), x.size(3))


class StageA(nn.Module):
    def __init__(
        self,
        levels: int = 2,
        bottleneck_blocks: int = 12,
        c_hidden: int = 384,
        c_latent: int = 4,
        codebook_size: int = 8192,
        scale_factor: float = 0.43,
    ) -> None:
        super().__init__()
        self.c_latent = c_latent
        self.scale_factor = scale_factor
        c_levels = [c_hidden // (2**i) for i in reversed(range(levels))]

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down: list[nn.Module] = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(StageAResBlock(c_levels[i], c_levels[i] * 4))
        down.append(
            nn.Sequential(nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent))
        )
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantize(c_latent, k=codebook_size)

        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in range(levels):
            for j in range(bottleneck_blocks if i == 0 else 1):
                up.append(StageAResBlock(c_levels[levels - 1 - i], c_levels[levels - 1 - i] * 4))
            if i < levels - 1:
                up.append(
                    nn.ConvTranspose2d(
                        c_levels[levels - 1 - i], c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1
                    )
                )
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    @property
    def dtype(self) -> torch.dtype:
        return self.out_block[0].weight.dtype

    def encode(self, x: torch.Tensor, quantize: bool = False) -> tuple[torch.Tensor, ...]:
        """Pixels (B,3,H,W) in [0,1] -> a tuple whose first item is the latent (B,4,H/4,W/4) / scale_factor.

        As official: `encode(x)[0]` is what Stage B was trained on; with `quantize=True` the tuple is
        (quantised latent, raw latent, codebook indices), each latent divided by `scale_factor`.
        """
        x = self.down_blocks(self.in_block(x.to(self.dtype)))
        if quantize:
            qx, indices = self.vquantizer(x)
            return qx / self.scale_factor, x / self.scale_factor, indices
        return (x / self.scale_factor,)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent (B,4,h,w) -> pixels (B,3,4h,4w); not clamped (the pipeline clamps to [0,1])."""
        return self.out_block(self.up_blocks(x.to(self.dtype) * self.scale_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])
