"""One timed text-to-image run over three stage runners: the pipeline's own phases, from precomputed embeddings.

The stage runners have the runtime's interface (`prepare_conditioning` + `denoise` for Stage C and B, `decode` for
Stage A), so a backend, a peer or the eager reference plug in alike. `run_once` puts them in a
`StableCascadePipeline` and calls its `prior` and `decoder` phases (`cascade_rt/pipeline.py`) — the code
`pipe(prompt)` runs after text encoding — timed per phase with CUDA events (`StageTimer`). The text encoder is
not run (the embeddings are random, see `inputs.py`), so "end to end" means Stage C + B + A.

Randomness: as in the pipeline, one CPU generator seeded identically for every backend draws the step noise,
so every backend sees the same noise and the outputs are comparable with the eager reference. The sampler is
the pipeline's hook (`sampling.sample_stage`, or the runtime's `GraphedSampler.sample_stage` for CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cascade_rt.benchmarks.inputs import CaseInputs
from cascade_rt.benchmarks.metrics import StageTimer
from cascade_rt.benchmarks.workloads import Case, StageSettings
from cascade_rt.pipeline import PromptEmbeds, StableCascadePipeline
from cascade_rt.sampling import sample_stage

Sampler = Callable[..., Tensor]  # the signature of sampling.sample_stage
STAGE_SECTIONS = ("stage_c", "stage_b", "stage_a")


@dataclass
class StageSet:
    """The three runners of one backend combination, and the sampler each denoiser uses."""

    c: Any
    b: Any
    a: Any
    sampler_c: Sampler = sample_stage
    sampler_b: Sampler = sample_stage
    _pipe: StableCascadePipeline | None = field(default=None, repr=False)

    def pipeline(self) -> StableCascadePipeline:
        if self._pipe is None:
            self._pipe = StableCascadePipeline(text_encoder=None, stage_c=self.c, stage_b=self.b, stage_a=self.a)
            self._pipe.samplers.update(c=self.sampler_c, b=self.sampler_b)
        return self._pipe


@dataclass
class RunOutput:
    latent_c: Tensor  # (B,16,h,w) fp32, Stage C result (last x0)
    latent_b: Tensor  # (B,4,H/4,W/4) fp32
    image: Tensor  # (B,3,H,W) fp32 in [0,1]
    ms: dict[str, float]  # per section + "total"


def _cfg(settings: StageSettings) -> float | None:
    return settings.cfg if settings.uses_cfg else None


@torch.inference_mode()
def run_once(stages: StageSet, case: Case, inputs: CaseInputs, device: torch.device) -> RunOutput:
    """One Stage C -> B -> A run through the pipeline's phases, timed per stage; returns the outputs and ms."""
    pipe, timer = stages.pipeline(), StageTimer(device)
    gen = torch.Generator("cpu").manual_seed(inputs.seed)
    sc, sb = case.stage_c, case.stage_b
    embeds = PromptEmbeds(inputs.clip_text, inputs.clip_text_pooled, inputs.uncond_text, inputs.uncond_pooled,
                          inputs.clip_img, inputs.clip_img)
    timer.start()
    latent_c = pipe.prior(embeds, inputs.x_c, steps=sc.steps, cfg=_cfg(sc), shift=sc.shift, gen=gen, timer=timer)
    image, latent_b = pipe.decoder(latent_c, embeds.pooled, embeds.u_pooled, inputs.x_b, steps=sb.steps,
                                   cfg=_cfg(sb), shift=sb.shift, gen=gen, timer=timer)
    timer.finish()
    return RunOutput(latent_c.float(), latent_b.float(), image, timer.elapsed_ms())
