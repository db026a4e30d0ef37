"""One timed text-to-image run over three stage runners, in the pipeline's order, from precomputed embeddings.

The stage runners have the runtime's interface (`prepare_conditioning` + `denoise` for Stage C and B, `decode` for
Stage A), so a backend, a peer or the eager reference plug in alike. The run mirrors
`cascade_rt.pipeline.StableCascadePipeline.__call__` after text encoding: Stage C (conditioning once, then the GDF
loop), Stage B (conditioning from Stage C's latent, the GDF loop), Stage A decode, clamp to [0, 1]. The text
encoder is not run (the embeddings are random, see `inputs.py`), so "end to end" means Stage C + B + A.

Randomness: the step noise comes from one generator on the run's device, seeded identically for every backend,
so every backend sees the same noise and the outputs are comparable with the eager reference. The sampler is
pluggable (`sampling.run_plan`, or the runtime's `GraphedSampler` for CUDA graphs): same signature, same noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cascade_rt.benchmarks.inputs import CaseInputs
from cascade_rt.benchmarks.metrics import StageTimer
from cascade_rt.benchmarks.workloads import Case, StageSettings
from cascade_rt.sampling import build_plan, run_plan

Sampler = Callable[..., Tensor]  # run_plan(model, x, plan, cond, uncond, *, cfg, cfg_rho, generator)
STAGE_SECTIONS = ("stage_c", "stage_b", "stage_a")


@dataclass
class StageSet:
    """The three runners of one backend combination, and the sampler each denoiser uses."""

    c: Any
    b: Any
    a: Any
    sampler_c: Sampler = run_plan
    sampler_b: Sampler = run_plan


@dataclass
class RunOutput:
    latent_c: Tensor  # (B,16,h,w) fp32, Stage C result (last x0)
    latent_b: Tensor  # (B,4,H/4,W/4) fp32
    image: Tensor  # (B,3,H,W) fp32 in [0,1]
    ms: dict[str, float]  # per section + "total"


def _cfg(settings: StageSettings) -> float | None:
    return settings.cfg if settings.uses_cfg else None


def _denoise(runner: Any) -> Callable[..., Tensor]:
    return lambda x, r, **cond: runner.denoise(x, r, **cond)


@torch.inference_mode()
def run_once(stages: StageSet, case: Case, inputs: CaseInputs, device: torch.device) -> RunOutput:
    """One Stage C -> B -> A run, timed per stage (CUDA events / perf_counter); returns the outputs and ms."""
    timer = StageTimer(device)
    gen = torch.Generator(device).manual_seed(inputs.seed)
    sc, sb = case.stage_c, case.stage_b
    timer.start()
    with timer.section("stage_c"):
        cond = stages.c.prepare_conditioning(inputs.clip_text, inputs.clip_text_pooled, inputs.clip_img)
        uncond = None
        if sc.uses_cfg:
            uncond = stages.c.prepare_conditioning(inputs.uncond_text, inputs.uncond_pooled, inputs.clip_img)
        plan = build_plan(sc.steps, shift=sc.shift, device=device)
        latent_c = stages.sampler_c(_denoise(stages.c), inputs.x_c, plan, cond, uncond, cfg=_cfg(sc), generator=gen)
    with timer.section("stage_b"):
        hw = tuple(inputs.x_b.shape[-2:])
        cond = stages.b.prepare_conditioning(latent_c, inputs.clip_text_pooled, latent_hw=hw)
        uncond = None
        if sb.uses_cfg:
            uncond = stages.b.prepare_conditioning(torch.zeros_like(latent_c), inputs.uncond_pooled, latent_hw=hw)
        plan = build_plan(sb.steps, shift=sb.shift, device=device)
        latent_b = stages.sampler_b(_denoise(stages.b), inputs.x_b, plan, cond, uncond, cfg=_cfg(sb), generator=gen)
    with timer.section("stage_a"):
        image = stages.a.decode(latent_b).float().clamp(0, 1)
    timer.finish()
    return RunOutput(latent_c.float(), latent_b.float(), image, timer.elapsed_ms())
