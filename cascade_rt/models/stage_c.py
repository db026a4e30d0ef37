"""Stage C, the text-conditional prior (official `modules/stage_c.py`), docs/reference.md §1.3.

Constructor arguments, names and defaults are the official ones (defaults = the 3.6B model).
`forward(x, r, clip_text, clip_text_pooled, clip_img, cnet=None)` returns the epsilon prediction and equals
`denoise(x, r, **prepare_conditioning(clip_text, clip_text_pooled, clip_img), cnet=cnet)`. `cnet` is the official
ControlNet output list (`cascade_rt.models.controlnet`): entry i is added, resized, before the i-th ResBlock call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade_rt.models.common import LayerNorm2d, UpDownBlock2d, layer_norm_fp32
from cascade_rt.models.unet import CascadeUNet, CondKV


class StageC(CascadeUNet):
    def __init__(
        self,
        c_in: int = 16,
        c_out: int = 16,
        c_r: int = 64,
        patch_size: int = 1,
        c_cond: int = 2048,
        c_hidden: Sequence[int] = (2048, 2048),
        nhead: Sequence[int] = (32, 32),
        blocks: Sequence[Sequence[int]] = ((8, 24), (24, 8)),
        block_repeat: Sequence[Sequence[int]] = ((1, 1), (1, 1)),
        level_config: Sequence[str] = ("CTA", "CTA"),
        c_clip_text: int = 1280,
        c_clip_text_pooled: int = 1280,
        c_clip_img: int = 768,
        c_clip_seq: int = 4,
        kernel_size: int = 3,
        dropout: Sequence[float] = (0.1, 0.1),
        self_attn: bool = True,
        t_conds: Sequence[str] = ("sca", "crp"),
        switch_level: Sequence[bool] | None = (False,),
    ) -> None:
        super().__init__()
        self.c_r, self.t_conds, self.c_clip_seq = c_r, list(t_conds), c_clip_seq
        self.c_in, self.patch_size, self.c_hidden = c_in, patch_size, tuple(c_hidden)  # read by export specs
        self.clip_txt_mapper = nn.Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = nn.Linear(c_clip_img, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )

        def downscaler(i: int) -> nn.Module:
            conv = (
                UpDownBlock2d(c_hidden[i - 1], c_hidden[i], mode="down", enabled=switch_level[i - 1])
                if switch_level is not None
                else nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2)
            )
            return nn.Sequential(LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6), conv)

        def upscaler(i: int) -> nn.Module:
            conv = (
                UpDownBlock2d(c_hidden[i], c_hidden[i - 1], mode="up", enabled=switch_level[i - 1])
                if switch_level is not None
                else nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2)
            )
            return nn.Sequential(LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6), conv)

        self._build_levels(
            c_hidden=c_hidden, c_cond=c_cond, nhead=nhead, blocks=blocks, block_repeat=block_repeat,
            level_config=level_config, kernel_size=kernel_size, dropout=dropout, self_attn=self_attn,
            downscaler=downscaler, upscaler=upscaler,
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )

    def gen_c_embeddings(
        self, clip_txt: torch.Tensor, clip_txt_pooled: torch.Tensor, clip_img: torch.Tensor
    ) -> torch.Tensor:
        """(B, 77 + 4 + 4, c_cond): mapped text tokens, pooled text and image embedding, one shared LayerNorm."""
        dtype = self.clip_txt_mapper.weight.dtype
        if clip_txt_pooled.dim() == 2:  # official intends this (its unsqueeze is lost); 3-D is the documented input
            clip_txt_pooled = clip_txt_pooled.unsqueeze(1)
        if clip_img.dim() == 2:
            clip_img = clip_img.unsqueeze(1)
        bsz = clip_txt.size(0)
        txt = self.clip_txt_mapper(clip_txt.to(dtype))
        pooled = self.clip_txt_pooled_mapper(clip_txt_pooled.to(dtype))
        pooled = pooled.view(bsz, clip_txt_pooled.size(1) * self.c_clip_seq, -1)
        img = self.clip_img_mapper(clip_img.to(dtype)).view(bsz, clip_img.size(1) * self.c_clip_seq, -1)
        return layer_norm_fp32(self.clip_norm, torch.cat([txt, pooled, img], dim=1))

    def prepare_conditioning(
        self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor, clip_img: torch.Tensor
    ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Step-invariant work, once per prompt: the conditioning tokens' K/V for every AttnBlock."""
        return {"cond_kv": self.precompute_cond_kv(self.gen_c_embeddings(clip_text, clip_text_pooled, clip_img))}

    def denoise(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        cond_kv: CondKV,
        cnet: Sequence[torch.Tensor | None] | None = None,
        **t_cond: torch.Tensor,
    ) -> torch.Tensor:
        """One denoiser evaluation given precomputed conditioning: epsilon (B, c_out, H, W) in the model dtype."""
        x = self.embedding(x.to(self.dtype))
        return self.clf(self._run_levels(x, r, cond_kv, t_cond, cnet))

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        clip_text: torch.Tensor,
        clip_text_pooled: torch.Tensor,
        clip_img: torch.Tensor,
        cnet: Sequence[torch.Tensor | None] | None = None,
        **t_cond: torch.Tensor,
    ) -> torch.Tensor:
        cond = self.prepare_conditioning(clip_text, clip_text_pooled, clip_img)
        return self.denoise(x, r, **cond, cnet=cnet, **t_cond)
