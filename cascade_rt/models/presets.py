"""Presets for every released checkpoint (docs/reference.md §2) and tiny ones for tests and CPU demos.

`build_model("stage_c", device="meta")` builds the 3.6B prior without allocating memory.
Tiny presets share one conditioning width (`TINY_CLIP_DIMS`) with the tiny text/image encoders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cascade_rt.errors import ConfigError
from cascade_rt.models.effnet import EfficientNetEncoder
from cascade_rt.models.previewer import Previewer
from cascade_rt.models.stage_a import StageA
from cascade_rt.models.stage_b import StageB
from cascade_rt.models.stage_c import StageC

# Conditioning widths of the tiny text (hidden, projection) and image (projection) encoders.
TINY_CLIP_DIMS = {"text_hidden": 32, "text_pooled": 32, "image": 24}


@dataclass(frozen=True)
class Preset:
    name: str
    stage: str  # "c", "b", "a", "effnet", "previewer"
    cls: type[nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    params: int | None = None  # exact official parameter count (docs/reference.md §2), None for tiny presets
    filename: str | None = None  # official checkpoint file stem


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("stage_c", "c", StageC, {}, 3_589_103_632, "stage_c"),
        Preset(
            "stage_c_lite", "c", StageC,
            dict(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]]),
            1_030_785_040, "stage_c_lite",
        ),
        Preset("stage_b", "b", StageB, {}, 1_562_941_136, "stage_b"),
        Preset(
            "stage_b_lite", "b", StageB,
            dict(c_hidden=[320, 576, 1152, 1152], nhead=[-1, 9, 18, 18], blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
                 block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]]),
            699_471_248, "stage_b_lite",
        ),
        Preset("stage_a", "a", StageA, {}, 18_406_894, "stage_a"),
        Preset("effnet", "effnet", EfficientNetEncoder, {"c_latent": 16}, 20_197_968, "effnet_encoder"),
        Preset("previewer", "previewer", Previewer, {}, 3_979_651, "previewer"),
        # tiny presets: same code paths (skips, repeats, attention, t_conds), seconds on a CPU
        Preset(
            "stage_c_tiny", "c", StageC,
            dict(c_cond=48, c_hidden=[48, 64], nhead=[2, 2], blocks=[[1, 2], [2, 1]],
                 c_clip_text=TINY_CLIP_DIMS["text_hidden"], c_clip_text_pooled=TINY_CLIP_DIMS["text_pooled"],
                 c_clip_img=TINY_CLIP_DIMS["image"]),
        ),
        Preset(
            "stage_b_tiny", "b", StageB,
            dict(c_cond=48, c_hidden=[16, 24, 32, 32], nhead=[-1, -1, 2, 2], blocks=[[1, 1, 1, 1], [1, 1, 1, 1]],
                 block_repeat=[[1, 1, 1, 1], [2, 2, 1, 2]], c_clip=TINY_CLIP_DIMS["text_pooled"]),
        ),
        Preset("stage_a_tiny", "a", StageA, dict(bottleneck_blocks=2, c_hidden=32, codebook_size=64)),
        Preset("previewer_tiny", "previewer", Previewer, dict(c_hidden=32)),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def build_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> nn.Module:
    """Build a preset's model in eval mode. On 'meta' nothing is allocated (shapes and parameter counts only).

    With `seed`, the weights are random but reproducible, and the zero-initialised scales (GRN gamma/beta, Stage A
    gammas) and BatchNorm statistics are randomised too, so random-weight models exercise every term.
    """
    preset = get_preset(name)
    with torch.device(device):
        if seed is None:
            model = preset.cls(**preset.kwargs)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = preset.cls(**preset.kwargs)
                if torch.device(device).type != "meta":
                    randomize_scales_(model)
    model.preset = name  # the engine cache names engines by it (cascade_rt.export.loader.preset_of)
    return model.to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def randomize_scales_(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Give the zero-initialised gains and BatchNorm statistics random values (uses the global RNG)."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gamma", "beta", "gammas"):
            p.normal_(0.0, std)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_(0.0, std)
            m.running_var.uniform_(0.5, 1.5)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
