"""The TensorRT path up to the builder, for real: the ONNX rewrites (Resize in fp32, ConvTranspose dtypes) on
exported graphs, checked numerically with ONNX Runtime, and the optimisation profiles from StageSpec. The builder
and the runner need tensorrt and a GPU: those tests skip with the reason."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from cascade_rt.errors import BackendUnavailable
from cascade_rt.export.build import EngineRequest, random_model
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.onnx_passes import (
    cast_resize_io_fp32,
    convtranspose_in_dtype,
    prepare_for_tensorrt,
    value_types,
)
from cascade_rt.export.specs import Dims
from cascade_rt.export.trt_engine import UNAVAILABLE, build_engine, build_settings

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
D = Dims(1, 256, 256)


@pytest.fixture
def bf16_stage_b(bf16_stage_b_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the bf16 dynamic Stage B graphs (the rewrite writes beside them)."""
    shutil.copytree(bf16_stage_b_dir, tmp_path / "bf16")
    return tmp_path / "bf16"


def ops_of(path: Path, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op]


def test_prepare_bf16_stage_b_for_strongly_typed_tensorrt(bf16_stage_b: Path):
    src = next(bf16_stage_b.glob("stage_b-*.onnx"))
    n_convt = len(ops_of(src, "ConvTranspose"))
    assert n_convt == 3  # tiny Stage B: three upscalers
    dst, counts = prepare_for_tensorrt(src)
    assert dst.name.endswith(".trt.onnx") and counts == {"resize_cast_to_fp32": 0, "convtranspose_in_fp32": n_convt}
    model = onnx.load(str(dst), load_external_data=False)
    types = value_types(model)
    for node in (n for n in model.graph.node if n.op_type == "ConvTranspose"):
        assert {types[i] for i in node.input if i} == {TensorProto.FLOAT}, node.name
    outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outs == {"eps": TensorProto.BFLOAT16}  # the graph's interface is unchanged
    onnx.checker.check_model(str(dst), full_check=True)


def test_exported_resizes_are_already_fp32(bf16_stage_b: Path):
    """Our models interpolate in fp32 (docs/reference.md §6.2), so bf16 graphs carry no bf16 Resize for TensorRT
    to reject."""
    src = next(bf16_stage_b.glob("stage_b_cond-*.onnx"))
    model = onnx.load(str(src), load_external_data=False)
    types = value_types(model)
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resizes and all(types[n.input[0]] == TensorProto.FLOAT for n in resizes)
    assert cast_resize_io_fp32(model) == 0


def test_resize_rewrite_keeps_numerics():
    """A fp16 Resize (what TensorRT lacks in bf16) becomes Cast -> fp32 Resize -> Cast; ORT agrees."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 5, 7])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3, 10, 14])
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 3, 10, 14])
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                            coordinate_transformation_mode="align_corners", name="up")
    graph = helper.make_graph([node], "g", [x], [y], initializer=[sizes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    before = model.SerializeToString()
    assert cast_resize_io_fp32(model) == 1
    onnx.checker.check_model(model, full_check=True)
    types = value_types(model)
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert types[resize.input[0]] == types[resize.output[0]] == TensorProto.FLOAT
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 5, 7)).astype(np.float16)}
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    np.testing.assert_allclose(run(model.SerializeToString()), run(before), atol=2e-3)


def test_convtranspose_rewrite_keeps_numerics(tmp_path: Path):
    """fp16 Stage A (ConvTranspose k4 s2 p1): computing it in fp32 changes the output only at fp16 rounding."""
    model = random_model("stage_a_tiny", "fp16", seed=0, device="cpu")
    request = EngineRequest("stage_a", "stage_a_tiny", "onnx", "fp16", "w", D)
    cache = EngineCache(tmp_path)
    cache.ensure(request, model)
    src = cache.engine_path(request)
    proto = onnx.load(str(src))
    assert convtranspose_in_dtype(proto, TensorProto.FLOAT, tmp_path) == 1
    onnx.checker.check_model(proto, full_check=True)
    feed = {"latent": np.random.default_rng(1).standard_normal((1, 4, 64, 64)).astype(np.float16)}
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    a, b = run(str(src)), run(proto.SerializeToString())
    assert np.linalg.norm(a.astype(np.float32) - b) / np.linalg.norm(b) < 1e-2


def test_profiles_come_from_the_spec():
    from cascade_rt.export.build import spec_for

    spec = spec_for("stage_b", "stage_b_lite")
    static = build_settings(spec, Dims(2, 1024, 1024, cfg=True), dynamic=False)
    assert static["profile"]["x"] == [[4, 4, 256, 256]] * 3
    assert static["profile"]["cond_kv"][0] == [36, 2, 4, 4, 1152]
    dyn = build_settings(spec, Dims(1, 1024, 1024), dynamic=True, builder_optimization_level=5, weight_streaming=True)
    assert dyn["profile"]["x_add"] == [[1, 320, 32, 32], [2, 320, 128, 128], [8, 320, 256, 256]]
    assert dyn["builder_optimization_level"] == 5 and dyn["weight_streaming"] and dyn["strongly_typed"]
    assert set(dyn["profile"]) == set(spec.input_names)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the builder test below runs instead")
def test_builder_reports_missing_tensorrt(bf16_stage_b: Path, tmp_path: Path):
    """Everything before `import tensorrt` runs (the rewrite happens first); then a clear BackendUnavailable."""
    from cascade_rt.export.build import spec_for

    src = next(bf16_stage_b.glob("stage_b-*.onnx"))
    settings = build_settings(spec_for("stage_b", "stage_b_tiny"), D, dynamic=False)
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
        build_engine(src, tmp_path / "x.plan", settings)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")
@pytest.mark.skipif(not HAS_TRT, reason=UNAVAILABLE)
def test_tensorrt_build_and_run(tmp_path: Path):
    model = random_model("stage_b_tiny", "bf16", seed=0, device="cuda")
    request = EngineRequest("stage_b", "stage_b_tiny", "tensorrt", "bf16", "w", D, device="cuda")
    engine = EngineCache(tmp_path).ensure(request, model)  # builds the ONNX graph, the plan, then validates
    inputs = engine.spec.sample_inputs(D, "bf16", device="cuda", seed=5)
    assert engine(inputs)["eps"].shape == (2, 4, 64, 64)
    assert (tmp_path / "tensorrt.timing-cache").is_file()
