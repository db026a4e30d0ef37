"""CUDA-graph runner: key logic, the static-buffer step (= sample_stage, CPU twin), fallbacks, debug checks;
GPU: graph replay equals eager per stage, input addresses stay put, whole-loop graphs, compile/triton stages."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from cascade_rt.errors import ConfigError, EngineError
from cascade_rt.models import build_model
from cascade_rt.runtime.cuda_graphs import GraphedSampler, GraphKey, StaticStep
from cascade_rt.sampling import build_plan, sample_stage

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")

SETTINGS = dict(steps=4, cfg=4.0, shift=2.0)


def _eager(model, x, cond, uncond, seed=7, **kw):
    return sample_stage(
        model.denoise, x, cond, uncond, generator=torch.Generator().manual_seed(seed), **{**SETTINGS, **kw}
    )


def _graphed(sampler, model, x, cond, uncond, seed=7, **kw):
    return sampler.sample_stage(model.denoise, x, cond, uncond, generator=torch.Generator().manual_seed(seed),
                                **{**SETTINGS, **kw})


# ------------------------------------------------------------------------------------------ keys
def test_graph_key_is_a_frozen_hashable_shape_descriptor():
    key = GraphKey("c", 2, 24, 24, torch.bfloat16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.batch = 3
    assert key == GraphKey("c", 2, 24, 24, torch.bfloat16) and len({key, GraphKey("c", 2, 24, 24, torch.bfloat16)}) == 1
    assert key.model_batch == 4 and dataclasses.replace(key, guided=False).model_batch == 2
    keys = [GraphKey("b", 1, 128, 128, torch.bfloat16), GraphKey("b", 2, 256, 256, torch.bfloat16), key]
    assert [k.size for k in sorted(keys, key=lambda k: k.size, reverse=True)] == [
        2 * 2 * 256 * 256, 2 * 128 * 128, 4 * 24 * 24
    ]


def test_key_for_reads_shape_dtype_and_settings(tiny_c, c_inputs):
    x, cond, _ = c_inputs(tiny_c, 3, 5)
    sampler = GraphedSampler("c", mode="static")
    key = sampler.key_for(x, build_plan(4), cond, guided=False, whole_loop=True)
    assert key == GraphKey("c", 3, 5, 5, torch.float32, guided=False, stochastic=True, loop_steps=4)
    assert sampler.key_for(x, build_plan(4, eta=0.0), cond, True, False).stochastic is False


def test_bad_modes_are_config_errors():
    with pytest.raises(ConfigError, match="graph mode"):
        GraphedSampler("c", mode="cudagraph")
    with pytest.raises(ConfigError, match="2 warm-up"):
        GraphedSampler("c", mode="graph", warmup_runs=1)


# ------------------------------------------------------------------------------------------ static step == eager
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(cfg=None), dict(eta=0.0), dict(t_start=0.6), dict(mode="diffusers", cfg=4.0), dict(cfg_rho=0.0)],
    ids=["cfg-rho", "no-cfg", "ddim", "t_start", "diffusers", "no-rho"],
)
def test_static_step_equals_sample_stage_stage_c(tiny_c, c_inputs, kw):
    x, cond, uncond = c_inputs(tiny_c, 2, 4)
    ref = _eager(tiny_c, x, cond, uncond, **kw)
    sampler = GraphedSampler("c", mode="static")
    out = _graphed(sampler, tiny_c, x, cond, uncond, **kw)
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert sampler.stats["replays"] == 4 and sampler.stats["fallbacks"] == 0
    # a second run reuses the same buffers and still equals eager (a different seed, same key)
    entry = next(iter(sampler.entries.values()))
    before = entry.static.addresses()
    assert torch.equal(
        _graphed(sampler, tiny_c, x, cond, uncond, seed=8, **kw), _eager(tiny_c, x, cond, uncond, seed=8, **kw)
    )
    assert entry.static.addresses() == before and len(sampler.entries) == 1


def test_static_step_equals_sample_stage_stage_b(tiny_b, b_inputs):
    x, cond, uncond = b_inputs(tiny_b, 1, 16)
    kw = dict(steps=3, cfg=1.1, shift=1.0)
    ref = _eager(tiny_b, x, cond, uncond, **kw)
    assert torch.equal(_graphed(GraphedSampler("b", mode="static"), tiny_b, x, cond, uncond, **kw), ref)


def test_whole_loop_is_one_replay_and_equal(tiny_c, c_inputs):
    x, cond, uncond = c_inputs(tiny_c, 1, 4)
    sampler = GraphedSampler("c", mode="static", whole_loop=True)
    assert torch.equal(_graphed(sampler, tiny_c, x, cond, uncond), _eager(tiny_c, x, cond, uncond))
    (key,) = sampler.entries
    assert key.loop_steps == 4 and sampler.stats["replays"] == 1


def test_callback_sees_every_step(tiny_c, c_inputs):
    x, cond, uncond = c_inputs(tiny_c, 1, 4)
    seen_eager, seen = [], []
    _eager(tiny_c, x, cond, uncond, callback=lambda i, x0, xt: seen_eager.append((i, x0.clone())))
    sampler = GraphedSampler("c", mode="static", whole_loop=True)  # a callback needs per-step replays
    _graphed(sampler, tiny_c, x, cond, uncond, callback=lambda i, x0, xt: seen.append((i, x0.clone())))
    assert [i for i, _ in seen] == [0, 1, 2, 3] and all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, seen_eager))
    assert next(iter(sampler.entries)).loop_steps == 0


def test_step_reads_no_host_values():
    """On the meta device any host read (.item(), a tensor-valued if) raises: the step has none."""
    model = build_model("stage_c_tiny", device="meta")
    text = torch.empty(2, 77, model.clip_txt_mapper.in_features, device="meta")
    pooled = torch.empty(2, 1, model.clip_txt_pooled_mapper.in_features, device="meta")
    img = torch.empty(2, 1, model.clip_img_mapper.in_features, device="meta")
    cond = model.prepare_conditioning(text, pooled, img)
    key = GraphKey("c", 1, 4, 4, torch.float32)
    static = StaticStep(key, model.denoise, cond, 16, 8, torch.device("meta"))
    static.load(torch.empty(1, 16, 4, 4, device="meta"), build_plan(4, device="meta"), cond, 4.0, 0.7)
    static.load_noise(4, None)
    static.run(4)


# ------------------------------------------------------------------------------------------ fallbacks
def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "cascade_rt.runtime.cuda_graphs"]


def test_uncaptured_shape_falls_back_with_one_warning(tiny_c, c_inputs, caplog):
    sampler = GraphedSampler("c", mode="static")
    x, cond, uncond = c_inputs(tiny_c, 1, 4)
    _graphed(sampler, tiny_c, x, cond, uncond)  # captures batch 1
    sampler.freeze()
    x2, cond2, uncond2 = c_inputs(tiny_c, 2, 4)
    with caplog.at_level(logging.WARNING):
        outs = [_graphed(sampler, tiny_c, x2, cond2, uncond2) for _ in range(3)]
    assert all(torch.equal(o, _eager(tiny_c, x2, cond2, uncond2)) for o in outs)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "not captured" in warnings[0].getMessage()
    assert sampler.stats["fallbacks"] == 3 and len(sampler.entries) == 1
    _graphed(sampler, tiny_c, x, cond, uncond)  # the captured shape still replays
    assert sampler.stats["replays"] == 8


def test_graph_mode_on_cpu_runs_eagerly_with_one_warning(tiny_c, c_inputs, caplog):
    sampler = GraphedSampler("c", mode="graph")
    x, cond, uncond = c_inputs(tiny_c, 1, 4)
    with caplog.at_level(logging.WARNING):
        outs = [_graphed(sampler, tiny_c, x, cond, uncond) for _ in range(2)]
    assert all(torch.equal(o, _eager(tiny_c, x, cond, uncond)) for o in outs)
    assert len(_warnings(caplog)) == 1 and not sampler.entries


def test_more_steps_than_buffers_fall_back(tiny_c, c_inputs, caplog):
    sampler = GraphedSampler("c", mode="static", max_steps=4)
    x, cond, uncond = c_inputs(tiny_c, 1, 4)
    _graphed(sampler, tiny_c, x, cond, uncond)
    with caplog.at_level(logging.WARNING):
        out = _graphed(sampler, tiny_c, x, cond, uncond, steps=5)
    assert torch.equal(out, _eager(tiny_c, x, cond, uncond, steps=5)) and len(_warnings(caplog)) == 1


def test_moved_weights_drop_the_graphs(c_inputs):
    model = build_model("stage_c_tiny", seed=2)
    sampler = GraphedSampler("c", mode="static", weights=lambda: list(model.parameters()))
    x, cond, uncond = c_inputs(model, 1, 4)
    _graphed(sampler, model, x, cond, uncond)
    _graphed(sampler, model, x, cond, uncond)
    assert sampler.stats["invalidations"] == 0
    with torch.no_grad():  # what a memory mode does: same values, new storage
        model.clf[1].weight.data = model.clf[1].weight.data.clone()
    assert torch.equal(_graphed(sampler, model, x, cond, uncond), _eager(model, x, cond, uncond))
    assert sampler.stats["invalidations"] == 1 and len(sampler.entries) == 1


def test_debug_mode_checks_input_addresses(tiny_c, c_inputs):
    sampler = GraphedSampler("c", mode="static", debug=True)
    x, cond, uncond = c_inputs(tiny_c, 1, 4)
    _graphed(sampler, tiny_c, x, cond, uncond)
    _graphed(sampler, tiny_c, x, cond, uncond)  # unchanged: fine
    entry = next(iter(sampler.entries.values()))
    entry.static.x = entry.static.x.clone()  # a buffer re-allocated behind the graph's back
    with pytest.raises(EngineError, match=r"moved since capture: \['x'\]"):
        _graphed(sampler, tiny_c, x, cond, uncond)


# ------------------------------------------------------------------------------------------ GPU
def _gpu_models(dtype):
    return {s: build_model(f"stage_{s}_tiny", device="cuda", dtype=dtype, seed=i) for i, s in enumerate("cb")}


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("whole_loop", [False, True], ids=["per-step", "whole-loop"])
def test_gpu_graph_replay_equals_eager(dtype, whole_loop, c_inputs, b_inputs):
    models = _gpu_models(dtype)
    pool = torch.cuda.graph_pool_handle()
    cases = {"c": (c_inputs(models["c"], 2, 24, device="cuda"), dict(steps=20, cfg=4.0, shift=2.0)),
             "b": (b_inputs(models["b"], 1, 64, device="cuda"), dict(steps=10, cfg=1.1, shift=1.0))}
    for stage, ((x, cond, uncond), kw) in cases.items():
        model = models[stage]
        sampler = GraphedSampler(stage, pool=pool, whole_loop=whole_loop, debug=True,
                                 weights=lambda m=model: list(m.parameters()))
        for seed in (1, 2):  # capture on the first call, replay on the second
            ref = _eager(model, x, cond, uncond, seed=seed, **kw)
            out = _graphed(sampler, model, x, cond, uncond, seed=seed, **kw)
            assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), stage
        assert sampler.stats["captures"] == 1 and sampler.stats["fallbacks"] == 0


@needs_gpu
@pytest.mark.gpu
def test_gpu_input_addresses_stable_and_no_sync_in_replay(c_inputs):
    model = build_model("stage_c_tiny", device="cuda", seed=0)
    x, cond, uncond = c_inputs(model, 1, 24, device="cuda")
    sampler = GraphedSampler("c", debug=True, weights=lambda: list(model.parameters()))
    gen = lambda: torch.Generator("cuda").manual_seed(0)  # noqa: E731  (device-side noise: no host copy)
    sampler.sample_stage(model.denoise, x, cond, uncond, generator=gen(), **SETTINGS)
    entry = next(iter(sampler.entries.values()))
    addresses = dict(entry.addresses)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            sampler.sample_stage(model.denoise, x, cond, uncond, generator=gen(), **SETTINGS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert entry.static.addresses() == addresses


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["compile", "triton"])
def test_gpu_graphs_capture_compile_and_triton_stages(backend, c_inputs):
    from cascade_rt.runtime.backends import BuildContext, build_runner

    ref_model = build_model("stage_c_tiny", device="cuda", dtype=torch.bfloat16, seed=0)
    model = build_model("stage_c_tiny", device="cuda", dtype=torch.bfloat16, seed=0)
    runner = build_runner("c", model, backend, BuildContext(torch.device("cuda"), torch.bfloat16))
    x, cond, uncond = c_inputs(ref_model, 2, 24, device="cuda")
    ref = _eager(ref_model, x, cond, uncond)
    sampler = GraphedSampler("c", debug=True, weights=lambda: list(model.parameters()))
    for _ in range(2):
        out = sampler.sample_stage(
            runner.denoise, x, cond, uncond, generator=torch.Generator().manual_seed(7), **SETTINGS
        )
    assert sampler.stats["captures"] == 1 and sampler.stats["fallbacks"] == 0
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 10 * runner.tolerance.bf16, rel


@needs_gpu
@pytest.mark.gpu
def test_gpu_uncapturable_step_falls_back_once(c_inputs, caplog):
    """A denoiser that reads a value on the host cannot be captured: eager, one warning, never retried."""
    model = build_model("stage_c_tiny", device="cuda", seed=0)
    x, cond, uncond = c_inputs(model, 1, 8, device="cuda")

    def host_reading(x, r, **kw):
        if float(r[0]) > 2:  # a host sync: illegal while capturing
            raise AssertionError
        return model.denoise(x, r, **kw)

    sampler = GraphedSampler("c")
    stream = torch.cuda.current_stream()
    with caplog.at_level(logging.WARNING):
        outs = [sampler.sample_stage(host_reading, x, cond, uncond, generator=torch.Generator().manual_seed(7),
                                     **SETTINGS) for _ in range(2)]
    assert torch.cuda.current_stream() == stream  # the failed capture left the caller's stream current
    ref = _eager(model, x, cond, uncond)
    assert all(torch.allclose(o, ref, atol=1e-5) for o in outs)
    assert len([w for w in _warnings(caplog) if "capture failed" in w.getMessage()]) == 1
    assert sampler.stats["captures"] == 0 and sampler.stats["fallbacks"] == 2
