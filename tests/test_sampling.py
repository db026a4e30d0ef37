"""GDF sampling: schedule values (docs/reference.md §3.8), CFG rescale, DDPM/DDIM steps, the loop, diffusers parity,
no host sync."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_rt.errors import ConfigError
from cascade_rt.sampling import (
    StepCoeffs,
    build_plan,
    cfg_combine,
    concat_conditioning,
    ddim_step,
    diffuse,
    log_snr,
    log_snr_limits,
    noise_cond,
    sample_stage,
    vp_scaler,
)

# docs/reference.md §3.8: (i, t, logSNR, r, a, b) for Stage C, 20 steps, shift 2
STAGE_C_TABLE = [
    (0, 1.00, -9.21024, 0.993583, 0.010000, 0.999950),
    (1, 0.95, -6.48632, 0.974962, 0.039011, 0.999239),
    (2, 0.90, -5.08779, 0.949695, 0.078318, 0.996928),
    (5, 0.75, -3.16655, 0.870071, 0.201108, 0.979569),
    (10, 0.50, -1.41092, 0.705645, 0.442819, 0.896611),
    (15, 0.25, 0.32506, 0.444138, 0.761943, 0.647644),
    (18, 0.10, 2.16427, 0.201812, 0.947098, 0.320944),
    (19, 0.05, 3.43491, 0.106265, 0.984265, 0.176698),
]
STAGE_B_LOGSNR = [-9.21024, -3.70150, -2.26521, -1.36690, -0.65969, -0.02463,
                  0.60797, 1.30640, 2.18293, 3.55056, 9.21007]


def test_limits():
    lo, hi = log_snr_limits()
    assert lo == pytest.approx(-9.21024, abs=1e-5)
    assert hi == pytest.approx(9.21007, abs=1e-5)


@pytest.mark.parametrize("row", STAGE_C_TABLE, ids=lambda r: f"i{r[0]}")
def test_stage_c_table(row):
    i, t, lsnr, r, a, b = row
    plan = build_plan(20, shift=2.0)
    assert plan.t[i].item() == pytest.approx(t, abs=1e-6)
    assert plan.log_snr[i].item() == pytest.approx(lsnr, abs=1e-5)
    assert plan.r[i].item() == pytest.approx(r, abs=2e-6)
    assert plan.a[i].item() == pytest.approx(a, abs=2e-6)
    assert plan.b[i].item() == pytest.approx(b, abs=2e-6)


def test_stage_c_endpoint():
    plan = build_plan(20, shift=2.0)
    assert plan.log_snr[20].item() == pytest.approx(7.82378, abs=1e-5)
    assert plan.a_next[19].item() == pytest.approx(0.999800, abs=2e-6)
    assert noise_cond(plan.log_snr[20:]).item() == pytest.approx(0.007122, abs=2e-6)
    # unclamped shift at t=1 would be -10.60: the limit is applied after the shift
    assert log_snr(torch.tensor([1.0]), shift=2.0).item() == pytest.approx(-9.21024, abs=1e-5)


def test_stage_b_table():
    plan = build_plan(10, shift=1.0)
    assert plan.log_snr.tolist() == pytest.approx(STAGE_B_LOGSNR, abs=1e-5)
    assert plan.r[0].item() == pytest.approx(0.993583, abs=2e-6)
    assert plan.r[1:].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], abs=2e-6)
    assert noise_cond(plan.log_snr[10:]).item() == pytest.approx(0.002257, abs=2e-6)


def test_cfg_rescale_uses_whole_half_batch_std():
    g = torch.Generator().manual_seed(0)
    pred_c = torch.randn(2, 3, 4, 4, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    pred_u = torch.randn(2, 3, 4, 4, generator=g)
    cfg, rho = 4.0, 0.7
    # hand-written formula, std over every element of the conditional half-batch (unbiased)
    lerp = pred_u + cfg * (pred_c - pred_u)
    flat_c, flat_cfg = pred_c.flatten().double(), lerp.flatten().double()
    std_c = math.sqrt(((flat_c - flat_c.mean()) ** 2).sum().item() / (flat_c.numel() - 1))
    std_cfg = math.sqrt(((flat_cfg - flat_cfg.mean()) ** 2).sum().item() / (flat_cfg.numel() - 1))
    expected = rho * lerp * (std_c / (std_cfg + 1e-9)) + (1 - rho) * lerp
    out = cfg_combine(pred_c, pred_u, cfg, rho)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    # a per-sample std gives a different answer with batch 2
    per_sample = rho * lerp * (pred_c.std(dim=(1, 2, 3), keepdim=True) / lerp.std(dim=(1, 2, 3), keepdim=True))
    per_sample = per_sample + (1 - rho) * lerp
    assert (out - per_sample).abs().max().item() > 1e-2
    # rho = 0: plain lerp
    torch.testing.assert_close(cfg_combine(pred_c, pred_u, cfg, 0.0), lerp)


def _coeffs_from_log_snr(l_now: float, l_next: float, eta: float, r: float = 0.5) -> tuple[StepCoeffs, dict]:
    a, b = math.sqrt(1 / (1 + math.exp(-l_now))), math.sqrt(1 / (1 + math.exp(l_now)))
    a2, b2 = math.sqrt(1 / (1 + math.exp(-l_next))), math.sqrt(1 / (1 + math.exp(l_next)))
    sigma = eta * math.sqrt(b2**2 / b**2) * math.sqrt(1 - a**2 / a2**2)
    ref = dict(a=a, b=b, a2=a2, b2=b2, sigma=sigma)
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return StepCoeffs(t(r), t(a), t(b), t(a2), t(math.sqrt(b2**2 - sigma**2)), t(sigma)), ref


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_single_step_against_formula(eta):
    g = torch.Generator().manual_seed(1)
    x, eps, noise = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    c, ref = _coeffs_from_log_snr(-1.41092, 0.32506, eta)
    x_next, x0 = ddim_step(x, eps, c, noise if eta > 0 else None)
    x0_ref = (x.double() - ref["b"] * eps.double()) / ref["a"]
    c_eps = math.sqrt(ref["b2"] ** 2 - ref["sigma"] ** 2)
    x_ref = ref["a2"] * x0_ref + c_eps * eps.double() + ref["sigma"] * noise.double()
    torch.testing.assert_close(x0, x0_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_next, x_ref.float(), rtol=1e-5, atol=1e-5)
    if eta == 0:
        assert ref["sigma"] == 0
    else:  # DDPM: sigma^2 = (b'^2/b^2)(1 - a^2/a'^2), and the plan computes the same numbers
        plan = build_plan(20, shift=2.0, eta=eta)
        lsnr = plan.log_snr.tolist()
        c10, ref10 = _coeffs_from_log_snr(lsnr[10], lsnr[11], eta)
        assert plan.sigma[10].item() == pytest.approx(ref10["sigma"], rel=1e-5)
        assert plan.c_eps[10].item() == pytest.approx(c10.c_eps.item(), rel=1e-5)


def _toy_model(x, r, scale):
    """eps = scale * x per sample (scale is the 'conditioning')."""
    return x * scale.view(-1, 1, 1, 1)


def _reference_loop(x, scale_c, scale_u, noises, *, steps, shift, cfg, rho, eta):
    """Independent float64 re-implementation of the official loop (math module schedule)."""
    lo, hi = -9.21024, 9.21007  # docs/reference.md §3.2 limits
    s = 0.008
    min_var = math.cos(s / (1 + s) * math.pi / 2) ** 2

    def lsnr(t):
        var = max(0.0, math.cos((s + t) / (1 + s) * math.pi / 2)) ** 2 / min_var
        var = min(max(var, 1e-4), 0.9999)
        return min(max(math.log(var / (1 - var)) - 2 * math.log(shift), lo), hi)

    def ab(logsnr):
        return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))

    x = x.double()
    x0 = None
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        (a, b), (a2, b2) = ab(lsnr(t)), ab(lsnr(t_next))
        pc, pu = x * scale_c.view(-1, 1, 1, 1), x * scale_u.view(-1, 1, 1, 1)
        pcfg = pu + cfg * (pc - pu)
        eps = rho * pcfg * (pc.std() / (pcfg.std() + 1e-9)) + (1 - rho) * pcfg
        x0 = (x - b * eps) / a
        sigma = eta * (b2 / b) * math.sqrt(1 - a**2 / a2**2)
        x = a2 * x0 + math.sqrt(b2**2 - sigma**2) * eps + sigma * noises[i].double()
    return x0, x


def test_loop_returns_last_x0_against_independent_loop():
    steps, shift, cfg, rho = 20, 2.0, 4.0, 0.7
    x_init = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"scale": torch.tensor([0.6, 0.9])}, {"scale": torch.tensor([0.3, 0.4])}
    noise_gen = torch.Generator().manual_seed(7)
    noises = [torch.randn(x_init.shape, generator=noise_gen) for _ in range(steps)]
    x0_ref, x_ref = _reference_loop(x_init, cond["scale"], uncond["scale"], noises,
                                    steps=steps, shift=shift, cfg=cfg, rho=rho, eta=1.0)
    seen = []
    out = sample_stage(
        _toy_model, x_init, cond, uncond, steps=steps, cfg=cfg, shift=shift, cfg_rho=rho,
        generator=torch.Generator().manual_seed(7), callback=lambda i, x0, x: seen.append((i, x0, x)),
    )
    assert [i for i, _, _ in seen] == list(range(steps))
    scale = x0_ref.abs().max().item()
    assert (out.double() - x0_ref).abs().max().item() < 1e-5 * scale
    assert out is seen[-1][1]  # the LAST x0, not the sampler's final x
    assert (seen[-1][2].double() - x_ref).abs().max().item() < 1e-5 * max(scale, 1.0)
    assert (seen[-1][2] - out).abs().max().item() > 1e-3


def test_eta0_is_deterministic_and_eta1_is_not():
    x_init = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"scale": torch.tensor([0.5])}, {"scale": torch.tensor([0.2])}
    kw = dict(steps=10, cfg=1.5, shift=1.0)
    run = lambda eta, seed: sample_stage(  # noqa: E731
        _toy_model, x_init, cond, uncond, eta=eta, generator=torch.Generator().manual_seed(seed), **kw
    )
    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert torch.equal(run(1.0, 1), run(1.0, 1))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))


def test_no_cfg_single_pass_batch_b():
    calls = []

    def model(x, r, scale):
        calls.append((x.shape[0], r.shape[0], scale.shape[0]))
        return x * 0.1

    x = torch.zeros(3, 1, 2, 2)
    sample_stage(model, x, {"scale": torch.ones(3)}, None, steps=2, cfg=4.0, shift=1.0)
    sample_stage(model, x, {"scale": torch.ones(3)}, {"scale": torch.ones(3)}, steps=2, cfg=None, shift=1.0)
    assert calls == [(3, 3, 3)] * 4
    calls.clear()
    sample_stage(model, x, {"scale": torch.ones(3)}, {"scale": torch.zeros(3)}, steps=2, cfg=4.0, shift=1.0)
    assert calls == [(6, 6, 6)] * 2


def test_diffusers_mode_matches_diffusers_scheduler():
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm_wuerstchen import DDPMWuerstchenScheduler

    steps, cfg = 10, 4.0
    x_init = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    cond, uncond = {"scale": torch.tensor([0.6, 0.8])}, {"scale": torch.tensor([0.3, 0.1])}

    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(11)
    latents, rs = x_init.clone(), []
    for t in sched.timesteps[:-1]:
        ratio = t.expand(latents.size(0))
        rs.append(ratio[0].item())
        pred = _toy_model(torch.cat([latents] * 2), torch.cat([ratio] * 2), torch.cat([cond["scale"], uncond["scale"]]))
        text, unc = pred.chunk(2)
        pred = torch.lerp(unc, text, cfg)
        latents = sched.step(model_output=pred, timestep=ratio, sample=latents, generator=gen).prev_sample
    seen_r = []
    out = sample_stage(
        lambda x, r, scale: (seen_r.append(r[0].item()), _toy_model(x, r, scale))[1],
        x_init, cond, uncond, steps=steps, cfg=cfg, shift=2.0, generator=torch.Generator().manual_seed(11),
        mode="diffusers",
    )
    assert seen_r == pytest.approx(rs, abs=1e-7)
    torch.testing.assert_close(out, latents, rtol=1e-5, atol=1e-5)
    official = sample_stage(_toy_model, x_init, cond, uncond, steps=steps, cfg=cfg, shift=2.0,
                            generator=torch.Generator().manual_seed(11))
    assert (official - out).abs().max().item() > 1e-2


@pytest.mark.parametrize("mode", ["official", "diffusers"])
def test_loop_has_no_host_sync(mode):
    """Meta tensors raise on .item()/bool()/float()/.cpu(): the loop must not read any value on the host."""

    def model(x, r, scale, kv):
        assert x.device.type == "meta" and r.device.type == "meta"
        return x * scale.view(-1, 1, 1, 1) + kv[0].mean() * r.view(-1, 1, 1, 1)

    meta = torch.device("meta")
    x_init = torch.empty(2, 4, 3, 3, device=meta)
    cond = {"scale": torch.empty(2, device=meta), "kv": [torch.empty(2, 5, device=meta)]}
    uncond = {"scale": torch.empty(2, device=meta), "kv": [torch.empty(2, 5, device=meta)]}
    out = sample_stage(model, x_init, cond, uncond, steps=4, cfg=4.0, shift=2.0,
                       generator=torch.Generator().manual_seed(0), mode=mode)
    assert out.device.type == "meta" and out.shape == x_init.shape
    with pytest.raises(Exception):
        out.sum().item()  # proves that a sync inside the loop would have raised


def test_img2img_plan_and_diffuse():
    plan = build_plan(16, shift=2.0, t_start=0.8)
    assert plan.t[0].item() == pytest.approx(0.8) and plan.t[-1].item() == 0.0 and plan.steps == 16
    assert plan.t[1].item() == pytest.approx(0.75, abs=1e-6)
    x0 = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    noised = diffuse(x0, 0.8, noise)
    logsnr = log_snr(torch.tensor([0.8]))
    a, b = vp_scaler(logsnr)
    assert noise_cond(logsnr).item() == pytest.approx(0.8, abs=1e-5)  # shift 1: r == t
    torch.testing.assert_close(noised, a * x0 + b * noise)
    assert a.item() ** 2 + b.item() ** 2 == pytest.approx(1.0, abs=1e-6)
    per_sample = diffuse(x0, torch.tensor([0.0, 1.0]), noise)
    torch.testing.assert_close(per_sample[1], 0.01 * x0[1] + 0.99995 * noise[1], rtol=1e-4, atol=1e-4)


def test_concat_conditioning_nested():
    c = {"a": torch.ones(1, 2), "kv": [(torch.ones(1, 3), torch.ones(1, 3)), None]}
    u = {"a": torch.zeros(1, 2), "kv": [(torch.zeros(1, 3), torch.zeros(1, 3)), None]}
    out = concat_conditioning(c, u)
    assert out["a"].tolist() == [[1, 1], [0, 0]]
    assert isinstance(out["kv"][0], tuple) and out["kv"][0][1][:, 0].tolist() == [1, 0] and out["kv"][1] is None
    with pytest.raises(ConfigError, match="different keys"):
        concat_conditioning({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="steps"):
        build_plan(0)
    with pytest.raises(ConfigError, match="mode"):
        build_plan(4, mode="euler")
    with pytest.raises(ConfigError, match="t_start"):
        build_plan(4, t_start=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sync debug mode is CUDA-only)")
def test_loop_has_no_cuda_sync():
    from cascade_rt.sampling import run_plan

    device = torch.device("cuda")
    plan = build_plan(4, shift=2.0, device=device)
    x = torch.randn(2, 4, 8, 8, device=device)
    cond, uncond = {"scale": torch.full((2,), 0.6, device=device)}, {"scale": torch.full((2,), 0.2, device=device)}
    gen = torch.Generator(device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run_plan(_toy_model, x, plan, cond, uncond, cfg=4.0, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = run_plan(_toy_model, x.cpu(), plan.to("cpu"), {"scale": cond["scale"].cpu()},
                   {"scale": uncond["scale"].cpu()}, cfg=4.0, generator=torch.Generator(device).manual_seed(0))
    torch.testing.assert_close(out, ref.to(device), rtol=1e-4, atol=1e-4)
