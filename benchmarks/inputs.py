"""Shapes and random inputs of one benchmark case, derived from the models themselves (no hard-coded widths).

Latent sizes come from the stage specs (`cascade_rt.export.specs`, the one place shapes live); the
conditioning widths are read off each model's input layers, so tiny presets and full presets share this code.
The benchmark feeds random text/image embeddings (seeded): the text encoder is not part of what is timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cascade_rt.benchmarks.workloads import Case
from cascade_rt.stages import latent_shape


def latent_hw(stage: str, height: int, width: int) -> tuple[int, int]:
    """Spatial size of a stage's latent ("c": Stage C, "b"/"a": Stage B and A), from the stage specs."""
    return tuple(latent_shape(stage, 1, height, width)[-2:])  # type: ignore[return-value]


@dataclass
class CaseInputs:
    """Everything a run needs besides the models: initial noise, conditioning, generator seeds."""

    x_c: Tensor  # (B, c_in, h, w) Stage C start noise, fp32
    x_b: Tensor  # (B, 4, H/4, W/4) Stage B start noise, fp32
    clip_text: Tensor  # (B, 77, c_text)
    clip_text_pooled: Tensor  # (B, 1, c_pooled)
    clip_img: Tensor  # (B, 1, c_img) zeros (text-to-image)
    uncond_text: Tensor  # the "empty prompt" embeddings: random too, distinct from the prompt's
    uncond_pooled: Tensor
    seed: int


def conditioning_dims(stage_c: nn.Module, stage_b: nn.Module) -> dict[str, int]:
    return {
        "text": stage_c.clip_txt_mapper.in_features,
        "pooled": stage_c.clip_txt_pooled_mapper.in_features,
        "image": stage_c.clip_img_mapper.in_features,
        "c_in_c": stage_c.c_in,
        "b_pooled": stage_b.clip_mapper.in_features,
        "c_in_b": stage_b.c_in,
    }


def make_inputs(case: Case, stage_c: nn.Module, stage_b: nn.Module, device: torch.device | str) -> CaseInputs:
    """Seeded random inputs for a case (identical for every backend, so outputs are comparable)."""
    wl, n = case.workload, case.batch
    dims = conditioning_dims(stage_c, stage_b)
    if dims["b_pooled"] != dims["pooled"]:
        raise ValueError(f"Stage B clip width {dims['b_pooled']} != Stage C pooled width {dims['pooled']}")
    gen = torch.Generator("cpu").manual_seed(wl.seed)
    hc, wc = latent_hw("c", wl.height, wl.width)
    hb, wb = latent_hw("b", wl.height, wl.width)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    return CaseInputs(
        x_c=randn(n, dims["c_in_c"], hc, wc),
        x_b=randn(n, dims["c_in_b"], hb, wb),
        clip_text=randn(n, 77, dims["text"]),
        clip_text_pooled=randn(n, 1, dims["pooled"]),
        clip_img=torch.zeros(n, 1, dims["image"], device=device),
        uncond_text=randn(n, 77, dims["text"]),
        uncond_pooled=randn(n, 1, dims["pooled"]),
        seed=wl.seed,
    )
