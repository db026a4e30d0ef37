"""GDF sampling for Stable Cascade, exactly as the official `gdf` package runs it (docs/reference.md §3).

Pieces, in the order the sampler uses them:

* `log_snr(t, shift)`   cosine schedule (s=0.008, var clamped to [1e-4, 0.9999]), shift applied in logSNR after the
                        clamp, then the limits [-9.21024, 9.21007] (the schedule at t=1 and t=0 with shift 1).
* `vp_scaler(log_snr)`  a = sqrt(sigmoid(logSNR)), b = sqrt(sigmoid(-logSNR)).
* `noise_cond(log_snr)` CosineTNoiseCond: the `r` the model sees (inverse cosine schedule of the *shifted* logSNR).
* `build_plan(...)`     every per-step number of a run, precomputed once as fp32 tensors (`StagePlan`).
* `cfg_combine(...)`    CFG lerp + the rho std-rescale (on by default, rho=0.7).
* `ddim_step(...)`      x0 = (x - b*eps)/a ; x' = a'*x0 + sqrt(b'^2 - sigma^2)*eps + sigma*noise  (eta=1: DDPM).
* `sample_stage(...)`   the loop; returns the LAST x0 prediction (official) or the final x (diffusers mode).

The loop never reads a tensor value on the host (no `.item()`, no tensor-valued `if`), so a step can later be
captured in a CUDA graph. `mode="diffusers"` reproduces diffusers' `DDPMWuerstchenScheduler` + plain lerp CFG
(no shift, no rho, r = the linspace t, CFG only when cfg > 1, no noise on the last step, returns the final x);
it is the same DDPM update written with diffusers' alpha-bar, so it shares `ddim_step`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cascade_rt.errors import ConfigError

logger = logging.getLogger(__name__)

COSINE_S = 0.008
VAR_CLAMP = (1e-4, 0.9999)
MODES = ("official", "diffusers")

Model = Callable[..., Tensor]  # model(x, r, **cond) -> eps
Callback = Callable[[int, Tensor, Tensor], None]  # callback(step, x0, x)


# --- schedule ----------------------------------------------------------------------------------------------


def _cosine_s() -> tuple[Tensor, Tensor]:
    """(s, min_var) as fp32 tensors, computed the way the official CosineSchedule does."""
    s = torch.tensor([COSINE_S], dtype=torch.float32)
    min_var = torch.cos(s / (1 + s) * math.pi * 0.5) ** 2
    return s, min_var


def _log_snr_cosine(t: Tensor) -> Tensor:
    """Cosine schedule t -> logSNR without shift or limits (fp32)."""
    s, min_var = _cosine_s()
    t = t.to(torch.float32).clamp(0, 1)
    var = torch.cos((s + t) / (1 + s) * math.pi * 0.5).clamp(0, 1) ** 2 / min_var
    var = var.clamp(*VAR_CLAMP)
    return (var / (1 - var)).log()


def log_snr_limits() -> tuple[float, float]:
    """(min, max) logSNR = the unshifted schedule at t=1 and t=0: (-9.21024, 9.21007)."""
    lo, hi = _log_snr_cosine(torch.tensor([1.0, 0.0])).tolist()
    return lo, hi


def log_snr(t: Tensor, shift: float = 1.0) -> Tensor:
    """Official GDF schedule: cosine + clamp, then shift in logSNR, then the limits."""
    out = _log_snr_cosine(t)
    if shift != 1:
        out = out + 2 * math.log(1 / shift)
    return out.clamp(*log_snr_limits())


def vp_scaler(log_snr_: Tensor) -> tuple[Tensor, Tensor]:
    """VP input scaler: noised = a*x0 + b*eps with a^2 + b^2 = 1."""
    return log_snr_.sigmoid().sqrt(), (-log_snr_).sigmoid().sqrt()


def noise_cond(log_snr_: Tensor) -> Tensor:
    """CosineTNoiseCond: the model's `r` (inverse of the unshifted cosine schedule), clamped to [0, 1]."""
    s, min_var = _cosine_s()
    s, min_var = s.to(log_snr_.device), min_var.to(log_snr_.device)
    var = log_snr_.sigmoid().clamp(0, 1)
    r = ((var * min_var) ** 0.5).acos() / (math.pi * 0.5) * (1 + s) - s
    return r.clamp(0, 1)


def diffuse(x0: Tensor, t: float | Tensor, noise: Tensor, shift: float = 1.0) -> Tensor:
    """Noise a clean latent to level t (docs/reference.md §4.5, image-to-image uses shift 1):
    a(t)*x0 + b(t)*noise, fp32."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    a, b = vp_scaler(log_snr(t, shift).to(x0.device))
    view = (-1,) + (1,) * (x0.dim() - 1)
    return x0.float() * a.view(view) + noise.to(x0.device).float() * b.view(view)


# --- the plan: every per-step number of one run --------------------------------------------------------------


class StepCoeffs(NamedTuple):
    """0-d fp32 tensors for step i (views into the plan, no host sync)."""

    r: Tensor  # noise level the model sees
    a: Tensor  # x0 = (x - b*eps) / a
    b: Tensor
    a_next: Tensor  # x' = a_next*x0 + c_eps*eps + sigma*noise
    c_eps: Tensor
    sigma: Tensor


@dataclass(frozen=True)
class StagePlan:
    """Per-step schedule tensors of one sampling run, fp32, on one device.

    `t` and `log_snr` have steps+1 entries (the levels); the others have `steps` entries (the transitions).
    `stochastic` says whether a step draws fresh noise; `output` is "x0" (official) or "x" (diffusers).
    """

    mode: str
    steps: int
    stochastic: bool
    output: str
    t: Tensor
    log_snr: Tensor
    r: Tensor
    a: Tensor
    b: Tensor
    a_next: Tensor
    c_eps: Tensor
    sigma: Tensor

    def coeffs(self, i: int) -> StepCoeffs:
        return StepCoeffs(self.r[i], self.a[i], self.b[i], self.a_next[i], self.c_eps[i], self.sigma[i])

    def to(self, device: torch.device | str) -> StagePlan:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, Tensor):
                moved[key] = value.to(device)
        return StagePlan(**moved)


def _diffusers_alpha_bar(t: Tensor) -> Tensor:
    """DDPMWuerstchenScheduler._alpha_cumprod with scaler=1 (fp32)."""
    s, min_var = _cosine_s()
    return (torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2 / min_var).clamp(*VAR_CLAMP)


def build_plan(
    steps: int,
    *,
    shift: float = 1.0,
    eta: float = 1.0,
    t_start: float = 1.0,
    mode: str = "official",
    device: torch.device | str | None = None,
) -> StagePlan:
    """Precompute the whole schedule of a run (t = linspace(t_start, 0, steps+1)) as fp32 tensors on `device`."""
    if mode not in MODES:
        raise ConfigError(f"unknown sampling mode {mode!r}; use one of {MODES}")
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 < t_start <= 1.0:
        raise ConfigError(f"t_start must be in (0, 1], got {t_start}")
    if shift <= 0:
        raise ConfigError(f"shift must be > 0, got {shift}")
    if eta < 0:
        raise ConfigError(f"eta must be >= 0 (1 = DDPM, 0 = DDIM), got {eta}")
    steps = int(steps)
    t = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float32)

    if mode == "official":
        lsnr = log_snr(t, shift)
        a_all, b_all = vp_scaler(lsnr)
        a, b, a_next, b_next = a_all[:-1], b_all[:-1], a_all[1:], b_all[1:]
        sigma = eta * (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).sqrt() if eta > 0 else torch.zeros_like(a)
        c_eps = (b_next**2 - sigma**2).clamp_min(0).sqrt()
        r = noise_cond(lsnr[:-1])
        stochastic, output, noise_mult = eta > 0, "x0", sigma
    else:  # diffusers: DDPM posterior with its alpha-bar; identical update, written in x0 form
        abar = _diffusers_alpha_bar(t)
        lsnr = (abar / (1 - abar)).log()
        a_all, b_all = abar.sqrt(), (1 - abar).sqrt()
        abar_t, abar_prev = abar[:-1], abar[1:]
        alpha = abar_t / abar_prev
        sigma = ((1 - alpha) * (1 - abar_prev) / (1 - abar_t)).sqrt()
        a, b, a_next = a_all[:-1], b_all[:-1], a_all[1:]
        c_eps = ((1 - abar_prev) - sigma**2).clamp_min(0).sqrt()
        noise_mult = sigma * (t[1:] != 0).float()  # diffusers adds no noise on the step that lands on t=0
        r = t[:-1].clone()
        stochastic, output = True, "x"

    plan = StagePlan(
        mode=mode, steps=steps, stochastic=stochastic, output=output, t=t, log_snr=lsnr, r=r,
        a=a, b=b, a_next=a_next, c_eps=c_eps, sigma=noise_mult,
    )
    return plan.to(device) if device is not None else plan


# --- step pieces ---------------------------------------------------------------------------------------------


def cfg_combine(
    pred_c: Tensor, pred_u: Tensor, cfg: float | Tensor, rho: float | Tensor = 0.7,
    one_minus_rho: float | Tensor | None = None,
) -> Tensor:
    """Official CFG: lerp(uncond, cond, cfg), then rescale towards the std of the conditional prediction.

    std is `torch.std` (unbiased) over ALL elements of the conditional half-batch: one scalar per call.
    `cfg`/`rho` may be 0-d device tensors (a CUDA graph changes them by copy); then `one_minus_rho` is given too
    (computed on the host, as the float path does) and the rescale always runs (rho = 0 leaves pred_cfg as is).
    """
    pred_cfg = torch.lerp(pred_u, pred_c, cfg)
    if not isinstance(rho, Tensor):
        if rho <= 0:
            return pred_cfg
        one_minus_rho = 1 - rho
    std_c, std_cfg = pred_c.std(), pred_cfg.std()
    return rho * (pred_cfg * std_c / (std_cfg + 1e-9)) + pred_cfg * one_minus_rho


def ddim_step(x: Tensor, eps: Tensor, c: StepCoeffs, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """One GDF step (DDIM with eta; eta=1 is DDPM). Returns (x_next, x0). `noise=None` means no noise term."""
    x0 = (x - c.b * eps) / c.a
    x_next = c.a_next * x0 + c.c_eps * eps
    if noise is not None:
        x_next = x_next + c.sigma * noise
    return x_next, x0


class RowGenerators:
    """One CPU generator per group of rows of a batch: noise for rows [i, i + n_i) comes from generator i.

    A batch that merges independent requests (the server's dynamic batching) passes this where a generator goes,
    so each request draws exactly the noise it would draw alone with its own seed. `device` is where the drawn
    noise lands (it is drawn on the CPU per group, then moved), so the samplers treat it as a same-device generator.
    """

    def __init__(self, groups: Sequence[tuple[torch.Generator, int]], device: torch.device | str = "cpu") -> None:
        self.groups, self.device = list(groups), torch.device(device)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.groups)

    def randn(self, shape: Sequence[int]) -> Tensor:
        """fp32 standard normal noise of `shape` (batch first, = `rows`), each group's rows from its generator."""
        if shape[0] != self.rows:
            raise ConfigError(f"noise for a batch of {shape[0]} rows, but the generators cover {self.rows}")
        parts = [torch.randn((n, *shape[1:]), generator=g, dtype=torch.float32) for g, n in self.groups]
        return torch.cat(parts).to(self.device)


def draw_noise(like: Tensor, generator: torch.Generator | RowGenerators | None) -> Tensor:
    """Standard normal noise shaped like `like` (fp32); drawn on the generator's device, then moved."""
    if isinstance(generator, RowGenerators):
        return generator.randn(like.shape).to(like.device)
    if generator is None:
        return torch.randn(like.shape, device=like.device, dtype=torch.float32)
    if generator.device.type == like.device.type:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(like.device)


def concat_conditioning(cond: Any, uncond: Any) -> Any:
    """[cond; uncond] along the batch: tensors cat on dim 0; dicts per key; lists/tuples elementwise; None stays."""
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ConfigError(f"cond and uncond have different keys: {sorted(cond)} vs {sorted(uncond)}")
        return {k: concat_conditioning(cond[k], uncond[k]) for k in cond}
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)) and len(cond) == len(uncond):
        return type(cond)(concat_conditioning(c, u) for c, u in zip(cond, uncond))
    if cond is None and uncond is None:
        return None
    raise ConfigError(
        f"cannot batch cond {type(cond).__name__} with uncond {type(uncond).__name__}: "
        "both must be tensors, dicts with the same keys, or lists/tuples of the same length"
    )


def sampler_step(
    model: Model,
    x: Tensor,
    c: StepCoeffs,
    inputs: Mapping[str, Any],
    *,
    cfg: float | Tensor | None,
    rho: float | Tensor = 0.7,
    one_minus_rho: float | Tensor | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One denoising step: the model (one call on [x; x] with the batched [cond; uncond] `inputs` when `cfg` is
    given), CFG + rescale, the GDF update. Returns (x_next, x0). The eager loop (`run_plan`) and the CUDA-graph
    step (`cascade_rt.runtime.cuda_graphs.StaticStep`, with cfg/rho as device tensors) both run this function."""
    n = x.shape[0]
    if cfg is not None:
        pred_c, pred_u = model(torch.cat([x, x], dim=0), c.r.expand(2 * n), **inputs).float().chunk(2)
        eps = cfg_combine(pred_c, pred_u, cfg, rho, one_minus_rho)
    else:
        eps = model(x, c.r.expand(n), **inputs).float()
    return ddim_step(x, eps, c, noise)


# --- the loop ------------------------------------------------------------------------------------------------


def run_plan(
    model: Model,
    x: Tensor,
    plan: StagePlan,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    *,
    cfg: float | None = None,
    cfg_rho: float = 0.7,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run a prebuilt plan from x (fp32). CFG runs one model call on [cond; uncond] (batch 2B)."""
    x = x.float()
    use_cfg = cfg is not None and uncond is not None
    if plan.mode == "diffusers":
        use_cfg, cfg_rho = use_cfg and cfg > 1, 0.0
    inputs = concat_conditioning(dict(cond), dict(uncond)) if use_cfg else dict(cond)
    x0 = x
    for i in range(plan.steps):
        noise = draw_noise(x, generator) if plan.stochastic else None
        x, x0 = sampler_step(model, x, plan.coeffs(i), inputs, cfg=cfg if use_cfg else None, rho=cfg_rho, noise=noise)
        if callback is not None:
            callback(i, x0, x)
    return x0 if plan.output == "x0" else x


def sample_stage(
    model: Model,
    x_init: Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    *,
    steps: int,
    cfg: float | None,
    shift: float,
    cfg_rho: float = 0.7,
    eta: float = 1.0,
    t_start: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    mode: str = "official",
    run: Callable[..., Tensor] = run_plan,
    plan_on_host: bool = False,
) -> Tensor:
    """Sample one stage from `x_init` (noise, or a noised latent when t_start < 1); returns fp32.

    official: result = the last x0 prediction. diffusers: result = the final x; shift, cfg_rho and eta are
    ignored there (diffusers has none of them) and CFG runs only when cfg > 1. `run` is the loop over the plan
    (`run_plan`, or a `GraphedSampler`, which wants the plan on the host: `plan_on_host`).
    """
    if mode == "diffusers" and (shift != 1 or eta != 1):
        logger.debug("diffusers mode ignores shift=%s and eta=%s", shift, eta)
    plan = build_plan(
        steps, shift=shift if mode == "official" else 1.0, eta=eta, t_start=t_start, mode=mode,
        device=None if plan_on_host else x_init.device,
    )
    return run(model, x_init, plan, cond, uncond, cfg=cfg, cfg_rho=cfg_rho, generator=generator, callback=callback)
