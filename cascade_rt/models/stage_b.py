"""Stage B, the decoder from the Stage C latent to the Stage A latent (official `modules/stage_b.py`),
docs/reference.md §1.4.

Constructor arguments, names and defaults are the official ones (defaults = the "3B"/1.5B model).
`forward(x, r, effnet, clip, pixels=None)` returns epsilon and equals
`denoise(x, r, **prepare_conditioning(effnet, clip, pixels, latent_hw=x.shape[-2:]))`: the effnet and pixels
terms added after the embedding, and the conditioning K/V, are step-invariant and computed once per prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade_rt.models.common import LayerNorm2d, interpolate_fp32, layer_norm_fp32
from cascade_rt.models.unet import CascadeUNet, CondKV


def _mapper(c_in: int, c_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_hidden * 4, kernel_size=1),
        nn.GELU(),
        nn.Conv2d(c_hidden * 4, c_hidden, kernel_size=1),
        LayerNorm2d(c_hidden, elementwise_affine=False, eps=1e-6),
    )


class StageB(CascadeUNet):
    def __init__(
        self,
        c_in: int = 4,
        c_out: int = 4,
        c_r: int = 64,
        patch_size: int = 2,
        c_cond: int = 1280,
        c_hidden: Sequence[int] = (320, 640, 1280, 1280),
        nhead: Sequence[int] = (-1, -1, 20, 20),
        blocks: Sequence[Sequence[int]] = ((2, 6, 28, 6), (6, 28, 6, 2)),
        block_repeat: Sequence[Sequence[int]] = ((1, 1, 1, 1), (3, 3, 2, 2)),
        level_config: Sequence[str] = ("CT", "CT", "CTA", "CTA"),
        c_clip: int = 1280,
        c_clip_seq: int = 4,
        c_effnet: int = 16,
        c_pixels: int = 3,
        kernel_size: int = 3,
        dropout: Sequence[float] = (0, 0, 0.1, 0.1),
        self_attn: bool = True,
        t_conds: Sequence[str] = ("sca",),
    ) -> None:
        super().__init__()
        self.c_r, self.t_conds, self.c_clip_seq, self.c_pixels = c_r, list(t_conds), c_clip_seq, c_pixels
        self.c_in, self.c_hidden = c_in, tuple(c_hidden)  # read by export specs
        self.effnet_mapper = _mapper(c_effnet, c_hidden[0])
        self.pixels_mapper = _mapper(c_pixels, c_hidden[0])
        self.clip_mapper = nn.Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )
        self._build_levels(
            c_hidden=c_hidden, c_cond=c_cond, nhead=nhead, blocks=blocks, block_repeat=block_repeat,
            level_config=level_config, kernel_size=kernel_size, dropout=dropout, self_attn=self_attn,
            downscaler=lambda i: nn.Sequential(
                LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2),
            ),
            upscaler=lambda i: nn.Sequential(
                LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2),
            ),
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        self.patch_size = patch_size

    def gen_c_embeddings(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, 4, c_cond): the pooled text embedding mapped to `c_clip_seq` tokens, LayerNorm'ed."""
        if clip.dim() == 2:
            clip = clip.unsqueeze(1)
        tokens = self.clip_mapper(clip.to(self.clip_mapper.weight.dtype)).view(
            clip.size(0), clip.size(1) * self.c_clip_seq, -1
        )
        return layer_norm_fp32(self.clip_norm, tokens)

    def prepare_conditioning(
        self,
        effnet: torch.Tensor,
        clip: torch.Tensor,
        pixels: torch.Tensor | None = None,
        *,
        latent_hw: Sequence[int],
    ) -> dict[str, object]:
        """Step-invariant work for a Stage B latent of spatial size `latent_hw` (= image size / 4).

        Returns `x_add` (B, c_hidden[0], h, w) = effnet_mapper(interp(effnet)) + interp(pixels_mapper(pixels)),
        and `cond_kv`. Official order: effnet is interpolated then mapped; pixels mapped then interpolated.
        """
        dtype = self.dtype
        hw = (latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size)  # no int(): stays symbolic in export
        if pixels is None:
            pixels = torch.zeros(effnet.size(0), self.c_pixels, 8, 8, device=effnet.device, dtype=dtype)
        x_add = self.effnet_mapper(interpolate_fp32(effnet, hw, dtype))
        x_add = x_add + interpolate_fp32(self.pixels_mapper(pixels.to(dtype)), hw, dtype)
        return {"x_add": x_add, "cond_kv": self.precompute_cond_kv(self.gen_c_embeddings(clip))}

    def denoise(
        self, x: torch.Tensor, r: torch.Tensor, x_add: torch.Tensor, cond_kv: CondKV, **t_cond: torch.Tensor
    ) -> torch.Tensor:
        """One denoiser evaluation given precomputed conditioning: epsilon (B, c_out, H, W) in the model dtype."""
        x = self.embedding(x.to(self.dtype)) + x_add
        return self.clf(self._run_levels(x, r, cond_kv, t_cond))

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        effnet: torch.Tensor,
        clip: torch.Tensor,
        pixels: torch.Tensor | None = None,
        **t_cond: torch.Tensor,
    ) -> torch.Tensor:
        cond = self.prepare_conditioning(effnet, clip, pixels, latent_hw=x.shape[-2:])
        return self.denoise(x, r, **cond, **t_cond)
