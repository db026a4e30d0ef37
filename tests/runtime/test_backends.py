"""Backend registry, per-stage spec parsing, availability messages, dispatch, and each CPU backend vs eager."""

from __future__ import annotations

import os

import pytest
import torch

from cascade_rt.errors import BackendUnavailable, ConfigError
from cascade_rt.models import build_model
from cascade_rt.runtime import (
    BACKENDS,
    BuildContext,
    available_backends,
    build_runner,
    default_backends,
    format_backend_spec,
    parse_backend_spec,
    relative_error,
    require_backend,
)
from cascade_rt.runtime.engine_backends import engine_step

# The triton backend on the CPU needs Triton's interpreter, switched on before triton is imported (the conftest
# does so on a machine without CUDA; scripts/test.sh exports it). On a GPU machine the gpu-marked tests run it.
cpu_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the triton backend on the CPU through Triton's interpreter (TRITON_INTERPRET=1 is not set: a GPU "
    "machine; its gpu-marked tests cover the backend there)",
)

CPU = BuildContext(device=torch.device("cpu"), dtype=torch.float32)
ALL = {"eager", "compile", "triton", "onnxruntime", "tensorrt", "aoti"}


def test_registry_is_an_explicit_dict_of_every_backend():
    assert set(BACKENDS) == ALL
    fresh = default_backends()
    assert fresh is not BACKENDS and set(fresh) == ALL
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.summary
        assert 0 <= backend.tolerance.fp32 <= backend.tolerance.bf16 <= 0.05
    assert BACKENDS["eager"].tolerance.for_dtype(torch.bfloat16) == 0.0
    assert {n for n, b in BACKENDS.items() if b.graph_safe} == {"eager", "compile", "triton", "tensorrt"}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("eager", {"c": "eager", "b": "eager", "a": "eager"}),
        (None, {"c": "eager", "b": "eager", "a": "eager"}),
        ("c=tensorrt,b=triton,a=eager", {"c": "tensorrt", "b": "triton", "a": "eager"}),
        (" c = onnxruntime , b=triton ", {"c": "onnxruntime", "b": "triton", "a": "eager"}),
        ("triton,a=eager", {"c": "triton", "b": "triton", "a": "eager"}),
        ("stage_c=compile,decoder=aoti", {"c": "compile", "b": "aoti", "a": "eager"}),
        ({"b": "triton"}, {"c": "eager", "b": "triton", "a": "eager"}),
    ],
)
def test_parse_backend_spec(spec, expected):
    assert parse_backend_spec(spec) == expected
    assert parse_backend_spec(format_backend_spec(expected)) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty backend spec"),
        ("c=eager,,b=eager", "empty backend spec"),
        ("c=", "unknown backend ''"),
        ("c=tensorrtt", "unknown backend 'tensorrtt'; choose one of: eager, compile"),
        ("d=eager", "unknown stage 'd'"),
        ("c=eager,c=triton", "stage 'c' is given twice"),
        ("eager,triton", "more than one default"),
        ("c:eager", "unknown backend 'c:eager'"),
        (42, "must be a string"),
    ],
)
def test_parse_backend_spec_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_backend_spec(spec)


@cpu_triton
def test_available_backends_say_why(monkeypatch):
    import triton  # noqa: F401  (imported: the interpreter can no longer be switched on in this process)

    status = available_backends("cpu")
    assert set(status) == ALL and status["eager"].available and status["eager"].reason is None
    assert not status["tensorrt"].available and "NVIDIA GPU" in status["tensorrt"].reason
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = available_backends("cpu")["triton"].reason
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends("cpu")["triton"].available
    with pytest.raises(BackendUnavailable, match=r"backend 'tensorrt' cannot run on cpu: TensorRT needs an NVIDIA GPU"):
        require_backend("tensorrt", torch.device("cpu"))
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        monkeypatch.delenv("TRITON_INTERPRET")
        build_runner("b", build_model("stage_b_tiny"), "triton", CPU)


def test_eager_runners_dispatch_per_stage(tiny_c, tiny_b, tiny_a, c_inputs, b_inputs):
    rc, rb, ra = (build_runner(s, m, "eager", CPU) for s, m in (("c", tiny_c), ("b", tiny_b), ("a", tiny_a)))
    x, cond, _ = c_inputs(tiny_c, 1, 4)
    r = torch.tensor([0.5])
    assert torch.equal(rc.denoise(x, r, **cond), tiny_c.denoise(x, r, **cond))
    xb, cond_b, _ = b_inputs(tiny_b, 1, 16)
    assert torch.equal(rb.denoise(xb, r, **cond_b), tiny_b.denoise(xb, r, **cond_b))
    latent = torch.randn(1, 4, 8, 8)
    assert torch.equal(ra.decode(latent), tiny_a.decode(latent))
    assert rc.model is tiny_c and rc.backend == "eager" and rc.graph_safe
    with pytest.raises(TypeError, match="no decode"):
        rc.decode(latent)
    with pytest.raises(TypeError, match="no denoise"):
        ra.denoise(latent, r)
    with pytest.raises(ConfigError, match="unknown stage"):
        build_runner("d", tiny_a, "eager", CPU)


@cpu_triton
def test_triton_runner_matches_eager_within_tolerance(c_inputs):
    """Through Triton's interpreter on the CPU (the kernels' own tests cover shapes and dtypes)."""
    ref = build_model("stage_c_tiny", seed=2)
    runner = build_runner("c", build_model("stage_c_tiny", seed=2), "triton", CPU)
    x, cond, _ = c_inputs(ref, 2, 4)
    r = torch.tensor([0.9, 0.3])
    err = relative_error(runner.denoise(x, r, **cond), ref.denoise(x, r, **cond))
    assert err <= runner.tolerance.fp32, err


@pytest.mark.slow
def test_compile_runner_matches_eager_within_tolerance(tiny_a):
    runner = build_runner("a", build_model("stage_a_tiny", seed=4), "compile", CPU)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    err = relative_error(runner.decode(latent), tiny_a.decode(latent))
    assert err <= runner.tolerance.fp32, err


class FakeEngine:
    """Stands in for an export-layer engine: records feeds, answers with the eager model."""

    def __init__(self, model):
        self.model, self.feeds = model, []

    def __call__(self, feed):
        from cascade_rt.export.graph_modules import unpack_cond_kv
        from cascade_rt.export.specs import attn_widths

        self.feeds.append(feed)
        if "latent" in feed:
            return {"images": self.model.decode(feed["latent"])}
        extra = {"x_add": feed["x_add"]} if "x_add" in feed else {}
        kv = unpack_cond_kv(feed["cond_kv"], attn_widths(self.model))
        return {"eps": self.model.denoise(feed["x"], feed["r"], cond_kv=kv, **extra)}


def test_engine_step_feeds_the_spec_inputs(tiny_b, tiny_a, b_inputs):
    engine = FakeEngine(tiny_b)
    step = engine_step("b", engine, torch.float32)
    x, cond, uncond = b_inputs(tiny_b, 1, 16)
    r = torch.tensor([0.7])
    assert torch.equal(step(x, r, **cond), tiny_b.denoise(x, r, **cond))
    feed = engine.feeds[0]
    assert set(feed) == {"x", "r", "cond_kv", "x_add"} and feed["r"].dtype == torch.float32
    assert feed["cond_kv"].shape[:3] == (len(tiny_b.attn_blocks()), 2, 1)
    for k, v in cond["cond_kv"]:  # in-place new values (what a graph's static buffers get) are always seen
        k.mul_(2)
    assert torch.equal(step(x, r, **cond), tiny_b.denoise(x, r, **cond))
    assert not torch.equal(engine.feeds[1]["cond_kv"], feed["cond_kv"])
    with pytest.raises(ConfigError, match="t_conds"):
        step(x, r, **cond, sca=r)
    decode = engine_step("a", FakeEngine(tiny_a), torch.float32)
    latent = torch.randn(1, 4, 8, 8)
    assert torch.equal(decode(latent), tiny_a.decode(latent))
