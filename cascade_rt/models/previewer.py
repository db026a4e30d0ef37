"""Previewer: a quick RGB look at a Stage C latent, (B,16,h,w) -> (B,3,8h,8w) (official `modules/previewer.py`)."""

from __future__ import annotations

import torch
from torch import nn


class Previewer(nn.Module):
    def __init__(self, c_in: int = 16, c_hidden: int = 512, c_out: int = 3) -> None:
        super().__init__()
        h, h2, h4 = c_hidden, c_hidden // 2, c_hidden // 4
        self.blocks = nn.Sequential(  # Conv -> GELU -> BN (BN after the activation), indices = checkpoint keys
            nn.Conv2d(c_in, h, kernel_size=1), nn.GELU(), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(h),
            nn.ConvTranspose2d(h, h2, kernel_size=2, stride=2), nn.GELU(), nn.BatchNorm2d(h2),
            nn.Conv2d(h2, h2, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(h2),
            nn.ConvTranspose2d(h2, h4, kernel_size=2, stride=2), nn.GELU(), nn.BatchNorm2d(h4),
            nn.Conv2d(h4, h4, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(h4),
            nn.ConvTranspose2d(h4, h4, kernel_size=2, stride=2), nn.GELU(), nn.BatchNorm2d(h4),
            nn.Conv2d(h4, h4, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(h4),
            nn.Conv2d(h4, c_out, kernel_size=1),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stage C latent -> RGB preview (unclamped; clamp to [0,1] to show it)."""
        return self.blocks(x.to(self.dtype))
