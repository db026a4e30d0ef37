"""LoRA switches on engines without a rebuild (export/refit.py), on the tiny Stage C exported by the project's own
exporter: the refit plan finds every target's initializer and its layout; an ONNX Runtime session with the planned
initializers overridden equals a graph exported from the merged model and agrees with eager; switching back
restores the base output bit for bit; graphs where a target is folded or shared are refused; AOTInductor loads
new constants; TensorRT refuses to refit an engine built without REFIT (tensorrt-marked)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from cascade_rt.errors import ConfigError, EngineError
from cascade_rt.export.build import EngineRequest, base_manifest, random_model
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.graph_modules import run_graph, stage_graph
from cascade_rt.export.refit import RefitPlan, make_plan, plan_for, refit_engine
from cascade_rt.export.specs import Dims, make_spec
from cascade_rt.export.trt_engine import UNAVAILABLE
from cascade_rt.models.lora import LoRAMerger, lora_targets, random_lora
from cascade_rt.runtime import relative_error

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
D = Dims(1, 256, 256)
PRESET = "stage_c_tiny"
ORT_FP32 = 1e-3  # the onnxruntime backend's fp32 tolerance against eager (OnnxRuntimeBackend.tolerance)


def _request(weights_hash: str, fmt: str = "onnxruntime", **kw) -> EngineRequest:
    return EngineRequest("stage_c", PRESET, fmt, "fp32", weights_hash, D, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny Stage C (fp32, seeded) and its ONNX Runtime engine, exported through the engine cache."""
    root = tmp_path_factory.mktemp("refit")
    model = random_model(PRESET, "fp32", seed=0, device="cpu")
    EngineCache(root).ensure(_request("base"), model)
    return root, model


def _fresh(root: Path, tmp_path: Path) -> EngineCache:
    dst = tmp_path / "engines"
    shutil.copytree(root, dst)
    return EngineCache(dst)


def _inputs(model, seed: int) -> dict[str, torch.Tensor]:
    return make_spec("stage_c", model, PRESET).sample_inputs(D, "fp32", seed=seed)


def _eager(model, inputs) -> torch.Tensor:
    return run_graph(stage_graph("stage_c", model), make_spec("stage_c", model, PRESET), inputs)["eps"]


def _initializer(path: Path, name: str) -> torch.Tensor:
    proto = onnx.load(str(path), load_external_data=False)
    return torch.from_numpy(numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name)).copy())


def test_plan_finds_every_target_with_its_layout(base, tmp_path):
    root, model = base
    cache = EngineCache(root)
    path = cache.engine_path(_request("base"))
    recorded = plan_for(cache.load(_request("base")), model)
    assert recorded == make_plan(path, model)  # recorded at export = made from the graph now
    targets = lora_targets(model)
    params = dict(model.named_parameters())
    assert [t.param for t in recorded.targets] == [f"{t.name}.{t.param}" for t in targets]
    assert not recorded.problems and len(recorded.targets) == 12  # 6 attention blocks x (in_proj, out_proj)
    for t in recorded.targets:
        (piece,) = t.pieces  # the exporter keeps each weight whole...
        assert piece.transpose and piece.dtype == "fp32"  # ...as W.T, the MatMul layout, in a new initializer
        weight = params[t.param].detach()
        assert piece.rows == (0, weight.shape[0])
        assert torch.equal(_initializer(path, piece.initializer), weight.t())
    assert len(set(recorded.initializers())) == len(recorded.targets)
    assert RefitPlan.from_dict(recorded.to_dict()) == recorded
    bf16 = random_model(PRESET, "bf16", seed=0, device="cpu")  # a bf16 pipeline's Stage C on an fp32 graph
    weights = recorded.weights(bf16)
    first = recorded.targets[0]
    assert weights[first.pieces[0].initializer].dtype == torch.float32
    assert torch.equal(weights[first.pieces[0].initializer], dict(bf16.named_parameters())[first.param].float().t())


def test_ort_override_equals_merged_export_and_eager(base, tmp_path):
    root, model = base
    cache = _fresh(root, tmp_path)
    model = random_model(PRESET, "fp32", seed=0, device="cpu")  # a private copy to merge into
    engine = cache.load(_request("base"))
    inputs = _inputs(model, seed=int(torch.randint(0, 2**31, ())))
    before = engine(inputs)["eps"].clone()
    assert relative_error(before, _eager(model, inputs)) <= ORT_FP32  # measured 4e-5..2e-4 on fresh inputs

    merger = LoRAMerger(model)
    merger.apply([random_lora(model, seed=3, std=0.2).with_scale(0.8)])
    seconds = refit_engine(engine, model)
    assert seconds > 0
    switched = engine(inputs)["eps"].clone()
    merged = cache.ensure(_request("merged"), model)  # the same model exported again
    exported = merged(inputs)["eps"]
    assert torch.equal(switched, exported)  # bit for bit: the same graph, the same initializer values
    eager = _eager(model, inputs)
    assert relative_error(switched, eager) <= ORT_FP32
    assert relative_error(switched, before) > 1e-2  # the LoRA changes the output

    merger.apply([])
    refit_engine(engine, model)
    assert torch.equal(engine(inputs)["eps"], before)  # back to the base: bit for bit
    assert cache.problems(_request("base")) == []  # the files on disk still hold the base LoRA-free weights


def _rewire(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def test_folded_target_is_refused(base, tmp_path):
    root, model = base
    src = EngineCache(root).engine_path(_request("base"))
    plan = make_plan(src, model)
    victim = plan.targets[1].pieces[0].initializer

    def fold(proto):  # the target's values no longer appear as such: e.g. a scale folded into the weight
        t = next(t for t in proto.graph.initializer if t.name == victim)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, victim))

    folded = make_plan(_rewire(src, tmp_path / "folded.onnx", fold), model)
    assert [p.split(":")[0] for p in folded.problems] == [plan.targets[1].param]
    with pytest.raises(EngineError, match="cannot switch LoRAs in place.*folded"):
        folded.check("folded.onnx")


def test_shared_initializer_is_refused(base, tmp_path):
    """Two targets with equal values stored once (an exporter's deduplication) cannot take different deltas."""
    root, _ = base
    model = random_model(PRESET, "fp32", seed=0, device="cpu")
    src = EngineCache(root).engine_path(_request("base"))
    plan = make_plan(src, model)
    a, b = plan.targets[2], plan.targets[4]  # two out_proj weights of the same width
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[b.param].copy_(params[a.param])
    keep, drop = a.pieces[0].initializer, b.pieces[0].initializer

    def dedupe(proto):
        for node in proto.graph.node:
            node.input[:] = [keep if i == drop else i for i in node.input]
        proto.graph.initializer.remove(next(t for t in proto.graph.initializer if t.name == drop))

    shared = make_plan(_rewire(src, tmp_path / "shared.onnx", dedupe), model)
    assert sorted(p.split(":")[0] for p in shared.problems) == sorted([a.param, b.param])
    assert "also holds" in shared.problems[0]


def test_refit_is_a_tensorrt_option_in_the_engine_identity():
    spec = make_spec("stage_c", random_model(PRESET, "fp32", device="meta"), PRESET)
    plain, refit = _request("w", "tensorrt"), _request("w", "tensorrt", refit=True)
    assert refit.name.endswith("-refit-tensorrt") and refit.name != plain.name
    assert base_manifest(refit, spec).refit and not base_manifest(plain, spec).refit
    assert base_manifest(refit, spec).mismatches(base_manifest(plain, spec)) == ["refit: engine has true, wanted false"]
    assert not refit.onnx_source().refit  # one ONNX graph serves both builds
    with pytest.raises(ConfigError, match="TensorRT build option"):
        _request("w", "onnxruntime", refit=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_aoti_loads_new_constants(tmp_path):
    """torch 2.14's loaded AOTInductor package takes new constant values by parameter name (load_constants)."""
    model = random_model(PRESET, "fp32", seed=0, device="cpu")
    engine = EngineCache(tmp_path).ensure(_request("base", "aoti"), model)
    inputs = _inputs(model, seed=int(torch.randint(0, 2**31, ())))
    before = engine(inputs)["eps"].clone()
    merger = LoRAMerger(model)
    merger.apply([random_lora(model, seed=4, std=0.2)])
    refit_engine(engine, model)
    switched = engine(inputs)["eps"].clone()
    base_error = relative_error(before, _eager(random_model(PRESET, "fp32", seed=0, device="cpu"), inputs))
    assert relative_error(switched, _eager(model, inputs)) <= max(2 * base_error, 1e-4)  # as good as unswitched
    assert relative_error(switched, before) > 1e-2
    merger.apply([])
    refit_engine(engine, model)
    assert torch.equal(engine(inputs)["eps"], before)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT or not torch.cuda.is_available(),
                    reason=UNAVAILABLE if not HAS_TRT else "TensorRT engines need a CUDA GPU")
def test_tensorrt_refit(tmp_path):
    """An engine built without REFIT refuses a refit; one built with it equals an engine built from the merged
    model (same kernels and weights) and agrees with eager."""
    model = random_model(PRESET, "fp32", seed=0, device="cuda")
    cache = EngineCache(tmp_path)
    kw = dict(device="cuda")
    plain = cache.ensure(_request("base", "tensorrt", **kw), model)
    with pytest.raises(EngineError, match="without TensorRT's REFIT flag"):
        refit_engine(plain, model)
    engine = cache.ensure(_request("base", "tensorrt", refit=True, **kw), model)
    inputs = {k: v.cuda() for k, v in _inputs(model, seed=int(torch.randint(0, 2**31, ()))).items()}
    before = engine(inputs)["eps"].clone()
    merger = LoRAMerger(model)
    merger.apply([random_lora(model, seed=5, std=0.2)])
    refit_engine(engine, model)
    switched = engine(inputs)["eps"].clone()
    assert relative_error(switched, _eager(model, inputs)) <= 2e-3  # the TensorRT backend's fp32 tolerance
    merged = cache.ensure(_request("merged", "tensorrt", refit=True, **kw), model)
    assert relative_error(switched, merged(inputs)["eps"]) <= 2e-3
    merger.apply([])
    refit_engine(engine, model)
    assert relative_error(engine(inputs)["eps"], before) <= 1e-6
