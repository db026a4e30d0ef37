"""The exported graphs: thin `nn.Module` wrappers whose forward signature is exactly a `StageSpec`'s inputs.

The denoisers take the per-step inputs only; the step-invariant conditioning (clip mappers, clip_norm, every
AttnBlock's `kv_mapper` and key/value projections, Stage B's effnet/pixels terms) is a separate small graph run
once per prompt. Its key/value projections travel as ONE tensor:

    cond_kv: (n_attn, 2, N, S, c)      [i, 0] = keys, [i, 1] = values of the i-th AttnBlock (`attn_blocks()` order)

`c` is the widest block; narrower blocks (only tiny presets mix widths) are zero-padded on the channel axis and
sliced back by `unpack_cond_kv`. For every released preset all blocks share one width and nothing is padded.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cascade_rt.errors import ConfigError
from cascade_rt.export.specs import attn_widths

CondKV = Sequence[tuple[torch.Tensor, torch.Tensor]]


def pack_cond_kv(cond_kv: CondKV) -> torch.Tensor:
    """[(k, v) per AttnBlock], each (N, S, c_i) -> (n_attn, 2, N, S, max c_i)."""
    width = max(k.shape[-1] for k, _ in cond_kv)
    pad = lambda t: t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    return torch.stack([torch.stack([pad(k), pad(v)]) for k, v in cond_kv])


def unpack_cond_kv(packed: torch.Tensor, widths: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of `pack_cond_kv`: views (no copies) of the packed tensor, sliced to each block's width."""
    if packed.dim() != 5 or packed.shape[0] != len(widths) or packed.shape[1] != 2:
        raise ConfigError(f"cond_kv must be (n_attn={len(widths)}, 2, N, S, c), got {tuple(packed.shape)}")
    full = packed.shape[-1]
    return [
        (packed[i, 0], packed[i, 1]) if w == full else (packed[i, 0, ..., :w], packed[i, 1, ..., :w])
        for i, w in enumerate(widths)
    ]


class StageCDenoiserGraph(nn.Module):
    """(x, r, cond_kv) -> eps: one Stage C step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.widths = model, attn_widths(model)

    def forward(self, x: torch.Tensor, r: torch.Tensor, cond_kv: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(x, r, unpack_cond_kv(cond_kv, self.widths))


class StageCControlDenoiserGraph(nn.Module):
    """(x, r, cond_kv, cnet) -> eps: one Stage C step with ControlNet projections (one per `control_blocks`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.widths = model, attn_widths(model)
        self.blocks = tuple(model.control_blocks)

    def forward(self, x: torch.Tensor, r: torch.Tensor, cond_kv: torch.Tensor, cnet: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(x, r, unpack_cond_kv(cond_kv, self.widths), cnet=unpack_cnet(cnet, self.blocks))


def pack_cnet(cnet: Sequence[torch.Tensor | None], blocks: Sequence[int]) -> torch.Tensor:
    """The official ControlNet list -> (n_blocks, N, c, h, w): the entries at `blocks`, stacked."""
    return torch.stack([cnet[b] for b in blocks])


def unpack_cnet(packed: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = [None] * (max(blocks) + 1)
    for i, b in enumerate(blocks):
        out[b] = packed[i]
    return out


class StageCConditioningGraph(nn.Module):
    """(clip_text, clip_text_pooled, clip_img) -> cond_kv: once per prompt."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor, clip_img: torch.Tensor) -> torch.Tensor:
        return pack_cond_kv(self.model.prepare_conditioning(clip_text, clip_text_pooled, clip_img)["cond_kv"])


class StageBDenoiserGraph(nn.Module):
    """(x, r, x_add, cond_kv) -> eps: one Stage B step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.widths = model, attn_widths(model)

    def forward(self, x: torch.Tensor, r: torch.Tensor, x_add: torch.Tensor, cond_kv: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(x, r, x_add, unpack_cond_kv(cond_kv, self.widths))


class StageBConditioningGraph(nn.Module):
    """(effnet, clip, x) -> (x_add, cond_kv); `x` (the Stage B latent) only sizes x_add. pixels = zeros (official).

    Calls `StageB.prepare_conditioning(effnet, clip, None, latent_hw=x.shape[-2:])`, whose latent size stays
    symbolic under torch.export, so a dynamic graph sizes x_add for every resolution of its profile.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, effnet: torch.Tensor, clip: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.model.prepare_conditioning(effnet, clip, None, latent_hw=x.shape[-2:])
        return cond["x_add"], pack_cond_kv(cond["cond_kv"])


class StageADecoderGraph(nn.Module):
    """latent (N, 4, h, w) -> images (N, 3, 4h, 4w), unclamped (the official decode, x0.43 inside)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent)


class ForwardGraph(nn.Module):
    """The model's own forward with one input (EfficientNet encoder, previewer)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TextGraph(nn.Module):
    """(input_ids, attention_mask) -> (clip_text, clip_text_pooled) of the CLIP text tower."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, attention_mask)


GRAPHS: dict[str, type[nn.Module]] = {
    "text": TextGraph,
    "stage_c": StageCDenoiserGraph,
    "stage_c_cond": StageCConditioningGraph,
    "stage_c_cnet": StageCControlDenoiserGraph,
    "stage_b": StageBDenoiserGraph,
    "stage_b_cond": StageBConditioningGraph,
    "stage_a": StageADecoderGraph,
    "effnet": ForwardGraph,
    "previewer": ForwardGraph,
}


def stage_graph(stage: str, model: nn.Module) -> nn.Module:
    """The module that is exported for `stage`; run eagerly it is also the reference engines are checked against."""
    try:
        return GRAPHS[stage](model).eval()
    except KeyError:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(GRAPHS)}") from None


def run_graph(graph: nn.Module, spec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eager run of a stage graph with named inputs -> named outputs (the engine calling convention)."""
    with torch.inference_mode():
        out = graph(*(inputs[n] for n in spec.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(spec.output_names, out))
