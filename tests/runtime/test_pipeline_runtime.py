"""load_pipeline end to end on tiny random models: eager equality, mixed backends (C on onnxruntime, B on triton
through the interpreter, A on eager) within tolerance, memory modes, batching/throughput, errors, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cascade_rt
from cascade_rt.errors import BackendUnavailable, ConfigError
from cascade_rt.pipeline import build_random_pipeline
from cascade_rt.runtime import relative_error
from cascade_rt.runtime.throughput import ThroughputRunner, make_batches

FAST = dict(height=256, width=256, steps_c=3, steps_b=2)
# End-to-end agreement with eager (fp32, tiny): per-call errors (backend tolerances) pass through both samplers
# and Stage A; measured ~6e-4 for C on onnxruntime, ~1e-6 for B on triton. Documented in docs/runtime.md.
PIPELINE_TOLERANCE_FP32 = 5e-3

# The triton backend on the CPU needs Triton's interpreter, switched on before triton is imported (the conftest
# does so on a machine without CUDA; scripts/test.sh exports it). On a GPU machine the gpu-marked tests run it.
cpu_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the triton backend on the CPU through Triton's interpreter (TRITON_INTERPRET=1 is not set: a GPU "
    "machine; its gpu-marked tests cover the backend there)",
)


@pytest.fixture(scope="module")
def reference():
    return build_random_pipeline("tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


def _load(**kw):
    return cascade_rt.load_pipeline(random_weights=True, preset="tiny", device="cpu", dtype=torch.float32, **kw)


def test_eager_runtime_is_the_reference_pipeline(reference):
    pipe = _load()
    out = pipe(["a cat", "a dog"], seed=3, **FAST)
    ref = reference(["a cat", "a dog"], seed=3, **FAST)
    assert torch.equal(out.pixels, ref.pixels) and torch.equal(out.stage_c_latent, ref.stage_c_latent)
    assert set(out.timings) == {"text", "stage_c", "stage_b", "stage_a"} and all(v > 0 for v in out.timings.values())
    assert out.backends == {"c": "eager", "b": "eager", "a": "eager"}
    assert out.peak_memory == {"text": None, "c": None, "b": None, "a": None}  # CPU: no allocator statistics
    assert out.graphs == {}  # no CUDA here


@pytest.mark.slow
@cpu_triton
def test_mixed_backends_match_eager(reference, engine_dir):
    """The issue's combination: C on ONNX Runtime, B on Triton (interpreter on a CPU), A eager."""
    pipe = _load(backend="c=onnxruntime,b=triton,a=eager", engine_dir=engine_dir, engine_shapes=((1, 256, 256),))
    assert pipe.backends == {"c": "onnxruntime", "b": "triton", "a": "eager"}
    kw = dict(FAST, steps_b=1)  # the Triton interpreter is slow: one Stage B step
    out, ref = pipe("a cat", seed=1, **kw), reference("a cat", seed=1, **kw)
    err_c = relative_error(out.stage_c_latent, ref.stage_c_latent)
    assert err_c <= PIPELINE_TOLERANCE_FP32, err_c
    assert relative_error(out.stage_b_latent, ref.stage_b_latent) <= PIPELINE_TOLERANCE_FP32
    assert relative_error(out.pixels, ref.pixels) <= PIPELINE_TOLERANCE_FP32
    assert any(p.suffix == ".onnx" for p in engine_dir.iterdir())


@pytest.mark.slow
def test_onnxruntime_stage_c_call_within_its_tolerance(reference, engine_dir, c_inputs):
    from cascade_rt.runtime import BuildContext, build_runner

    model = build_random_pipeline("tiny", dtype=torch.float32).stage_c  # same seeds: same weights as reference
    runner = build_runner("c", model, "onnxruntime", BuildContext(torch.device("cpu"), torch.float32,
                                                                  shapes=((1, 256, 256),), engine_dir=engine_dir))
    x, cond, uncond = c_inputs(model, 2, 6)
    r = torch.tensor([0.99, 0.2])
    err = relative_error(runner.denoise(x, r, **cond), reference.stage_c.denoise(x, r, **cond))
    assert err <= runner.tolerance.fp32 and not runner.graph_safe


@pytest.mark.parametrize("memory", ["sequential", "offload"])
def test_memory_modes_give_the_same_images_on_cpu(reference, memory):
    out = _load(memory=memory)("a cat", seed=2, **FAST)
    assert torch.equal(out.pixels, reference("a cat", seed=2, **FAST).pixels)


def test_load_pipeline_errors(monkeypatch):
    with pytest.raises(ConfigError, match="weights=DIR .* or random_weights=True"):
        cascade_rt.load_pipeline(preset="tiny", device="cpu")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        cascade_rt.load_pipeline(random_weights=True, preset="huge", device="cpu")
    with pytest.raises(ConfigError, match="only with random_weights"):
        cascade_rt.load_pipeline("some/dir", preset="tiny", device="cpu")
    with pytest.raises(ConfigError, match="unknown backend 'tensorrtt'"):
        _load(backend="c=tensorrtt")
    # an unavailable backend is refused before any model is built
    monkeypatch.setattr("cascade_rt.runtime.api.build_random_pipeline", lambda *a, **k: pytest.fail("built models"))
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' cannot run on cpu: TensorRT needs an NVIDIA GPU"):
        _load(backend="c=tensorrt")


def test_make_batches():
    assert make_batches(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert make_batches([], 3) == []
    with pytest.raises(ConfigError, match="max_batch"):
        make_batches(["a"], 0)


def test_throughput_batches_equal_per_batch_calls(reference):
    pipe = _load()
    runner = ThroughputRunner(pipe, max_batch=2)
    assert not runner.overlap  # CPU: the phases run one after the other
    outs = runner(["a cat", "a dog", "a fox"], seed=10, **FAST)
    assert len(outs) == 2 and runner.last["images"] == 3 and runner.last["batches"] == 2
    for out, prompts, seed in ((outs[0], ["a cat", "a dog"], 10), (outs[1], ["a fox"], 11)):
        ref = reference(prompts, seed=seed, **FAST)
        assert out.seed == seed and torch.equal(out.pixels, ref.pixels)
        assert set(out.timings) == {"text", "stage_c", "stage_b", "stage_a"}


@pytest.mark.slow
def test_cli_generate_with_mixed_backends(tmp_path, engine_dir, reference):
    """The issue's command, in a fresh process without TRITON_INTERPRET (the backend switches the interpreter
    on), in the default bf16: C's ONNX graph runs in fp32 on a CPU (ORT has no bf16 kernels there), B's kernels
    in bf16. Against the fp32 eager image it must be as close as the eager bf16 image is (style rule: within
    ~2x PyTorch's own low-precision error)."""
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--random-weights", "--preset", "tiny", "--device", "cpu",
            "--height", "256", "--width", "256", "--steps-c", "3", "--steps-b", "1", "--seed", "4",
            "--backend", "c=onnxruntime,b=triton,a=eager", "--engine-dir", str(engine_dir), "-o", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "cascade_rt.cli", *args], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "timings:" in res.stdout and "RANDOM WEIGHTS" in res.stderr
    image = Image.open(out)
    meta = json.loads(image.text["cascade-rt"])
    assert meta["seed"] == 4 and meta["dtype"] == "bf16" and image.size == (256, 256)
    kw = dict(seed=4, height=256, width=256, steps_c=3, steps_b=1)
    pixels = lambda im: np.asarray(im, dtype=np.int16)  # noqa: E731
    fp32 = pixels(reference("a cat", **kw).images[0])
    eager16 = pixels(build_random_pipeline("tiny", dtype=torch.bfloat16)("a cat", **kw).images[0])
    mixed = pixels(image)
    for metric in (lambda d: d.max(), lambda d: d.mean()):
        err_eager, err_mixed = metric(np.abs(eager16 - fp32)), metric(np.abs(mixed - fp32))
        assert err_mixed <= 2 * err_eager + 1, (err_mixed, err_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")
def test_gpu_pipeline_with_graphs_equals_eager_and_overlap():
    pipe = cascade_rt.load_pipeline(random_weights=True, preset="tiny", device="cuda", dtype=torch.bfloat16)
    eager = cascade_rt.load_pipeline(random_weights=True, preset="tiny", device="cuda", dtype=torch.bfloat16,
                                     cuda_graphs=False)
    kw = dict(height=512, width=512, steps_c=20, steps_b=10)
    for seed in (0, 1):
        out, ref = pipe("a cat", seed=seed, **kw), eager("a cat", seed=seed, **kw)
        assert relative_error(out.pixels, ref.pixels) <= 1e-3
    assert pipe.graphed["c"].stats["captures"] == 1 and pipe.graphed["c"].stats["replays"] == 40
    runner = ThroughputRunner(pipe, max_batch=2)
    assert runner.overlap
    outs = runner(["a", "b", "c", "d", "e"], seed=5, **kw)
    for k, prompts in enumerate([["a", "b"], ["c", "d"], ["e"]]):
        assert relative_error(outs[k].pixels, eager(prompts, seed=5 + k, **kw).pixels) <= 1e-3
