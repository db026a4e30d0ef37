"""ONNX export of every tiny stage: valid graphs, ONNX Runtime parity, the conditioning split, dynamic shapes,
reduced precision and external data."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from cascade_rt.errors import ConfigError
from cascade_rt.export import onnx_export
from cascade_rt.export.build import EngineRequest, random_model
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.graph_modules import run_graph, stage_graph
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.onnx_export import check_onnx
from cascade_rt.export.opener import open_engine
from cascade_rt.export.sources import model_from_manifest, random_source
from cascade_rt.export.specs import GRAPHS, VARIANTS, Dims, StageSpec, make_spec
from cascade_rt.export.validate import output_errors, tolerance_for

D256 = Dims(1, 256, 256, cfg=True)
EXPORTED = tuple(g for g in GRAPHS if g not in VARIANTS)  # what `--stage all` writes (variants: tests/test_extensions)


def manifests(root: Path) -> dict[str, Path]:
    return {Manifest.read(p).stage: p for p in root.glob("*.json")}


def test_cli_export_all_writes_valid_graphs(tiny_onnx_dir: Path):
    found = manifests(tiny_onnx_dir)
    assert sorted(found) == sorted(EXPORTED)
    for stage, path in found.items():
        m = Manifest.read(path)
        assert m.validation["status"] == "passed", (stage, m.validation)
        assert not m.file_problems(tiny_onnx_dir)
        spec = StageSpec.from_dict(m.spec)
        ops = check_onnx(tiny_onnx_dir / m.engine_file, spec, "fp32")  # checker(full) + strict shape inference
        proto = onnx.load(tiny_onnx_dir / m.engine_file, load_external_data=False)
        opset = {o.domain: o.version for o in proto.opset_import}
        assert opset[""] >= 17
        if stage in ("stage_c", "stage_b", "stage_a", "text"):
            assert "LayerNormalization" in ops, ops
        assert m.versions["torch"] == torch.__version__ and m.device["type"] == "cpu"
        assert set(m.validation["outputs"]) == set(spec.output_names)


@pytest.mark.parametrize("stage", EXPORTED)
def test_ort_parity_fp32_on_fresh_inputs(tiny_onnx_dir: Path, stage: str):
    path = manifests(tiny_onnx_dir)[stage]
    m = Manifest.read(path)
    engine = open_engine(path)
    model = model_from_manifest(m)
    graph = stage_graph(stage, model)
    for seed in (11, 12):
        inputs = engine.spec.sample_inputs(D256, "fp32", seed=seed)
        got, want = engine(**inputs), run_graph(graph, engine.spec, inputs)
        for name in engine.spec.output_names:
            err = output_errors(got[name], want[name])
            assert err["rel_l2"] <= tolerance_for(engine.spec, "fp32")["rel_l2"], (name, err)


@pytest.mark.parametrize("preset,family", [("stage_c_tiny", "c"), ("stage_b_tiny", "b")])
def test_split_graphs_equal_the_unsplit_model(tiny_onnx_dir: Path, preset: str, family: str):
    """denoiser(conditioning(...)) == the official forward, eagerly and through the two ONNX graphs."""
    model = random_source(f"stage_{family}", preset, "fp32", seed=0).model  # the weights the CLI exported
    found = manifests(tiny_onnx_dir)
    cond_engine, den_engine = open_engine(found[f"stage_{family}_cond"]), open_engine(found[f"stage_{family}"])
    cond_spec, den_spec = cond_engine.spec, den_engine.spec
    cin = cond_spec.sample_inputs(D256, "fp32", seed=3)
    din = den_spec.sample_inputs(D256, "fp32", seed=4)
    x, r = din["x"], din["r"]
    if family == "c":
        full = model(x, r, cin["clip_text"], cin["clip_text_pooled"], cin["clip_img"])
    else:
        full = model(x, r, cin["effnet"], cin["clip"])
        cin["x"] = x
    eager_cond = run_graph(stage_graph(cond_spec.stage, model), cond_spec, cin)
    eager = run_graph(stage_graph(den_spec.stage, model), den_spec, {**eager_cond, "x": x, "r": r})["eps"]
    torch.testing.assert_close(eager, full, rtol=1e-5, atol=1e-5)
    onnx_cond = cond_engine(**cin)
    onnx_eps = den_engine(**{**onnx_cond, "x": x, "r": r})["eps"]
    err = output_errors(onnx_eps, full)
    assert err["rel_l2"] <= tolerance_for(den_spec, "fp32")["rel_l2"], err


@pytest.mark.parametrize("stage,preset", [("stage_b_cond", "stage_b_tiny"), ("stage_a", "stage_a_tiny")])
def test_dynamic_shapes(tmp_path: Path, stage: str, preset: str):
    """One dynamic graph, run at two batch sizes and resolutions (Stage B's latent is 32*k, x_add 16*k)."""
    model = random_model(preset, "fp32", seed=0, device="cpu")
    spec = make_spec(stage, model, preset)
    out = onnx_export.export_onnx(model, spec, tmp_path / f"{stage}.onnx", dims=Dims(1, 512, 384), dynamic=True)
    proto = onnx.load(out.path, load_external_data=False)
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "N" and "" not in [dims[i] for i, s in enumerate(spec.inputs[0].shape) if isinstance(s, str)]
    from cascade_rt.export.ort_engine import OrtEngine

    engine = OrtEngine(out.path, spec, "fp32")
    for d in (Dims(1, 256, 256, cfg=False), Dims(3, 768, 1280, cfg=True)):
        inputs = spec.sample_inputs(d, "fp32", seed=1)
        got, want = engine(inputs), run_graph(stage_graph(stage, model), spec, inputs)
        for name in spec.output_names:
            assert got[name].shape == want[name].shape
            assert output_errors(got[name], want[name])["rel_l2"] <= tolerance_for(spec, "fp32")["rel_l2"]


def test_fp16_runs_on_ort_cpu(tmp_path: Path):
    model = random_model("stage_a_tiny", "fp16", seed=0, device="cpu")
    request = EngineRequest("stage_a", "stage_a_tiny", "onnxruntime", "fp16", "w", Dims(1, 256, 256))
    engine = EngineCache(tmp_path).ensure(request, model)
    m = Manifest.read(EngineCache(tmp_path).manifest_path(request))
    assert m.validation["status"] == "passed" and m.build["opset"] == 18
    assert engine(latent=torch.randn(1, 4, 64, 64))["images"].dtype == torch.float16


def test_bf16_graph_is_valid_and_unvalidated_on_the_cpu(bf16_stage_b_dir: Path):
    """bf16 graphs need opset 22 (bf16 Conv); ORT's CPU provider cannot run them, and the manifest says so."""
    request = EngineRequest("stage_b", "stage_b_tiny", "onnx", "bf16", "w", Dims(1, 256, 256), dynamic=True)
    cache = EngineCache(bf16_stage_b_dir)
    m = Manifest.read(cache.manifest_path(request))
    assert m.build["opset"] == 22 and m.validation["status"] == "unvalidated" and m.dynamic
    assert "bf16" in m.validation["reason"]
    check_onnx(cache.engine_path(request), StageSpec.from_dict(m.spec), "bf16")
    assert cache.problems(request) == []  # unvalidated is usable (TensorRT builds from it)
    proto = onnx.load(cache.engine_path(request), load_external_data=False)
    x = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert x == ["N", "", "hb", "wb"]  # dynamic axes named as in the spec


def test_fp16_refused_for_stage_c(tmp_path: Path):
    model = random_model("stage_c_tiny", "fp32", seed=0, device="cpu")
    request = EngineRequest("stage_c", "stage_c_tiny", "onnx", "fp16", "w", D256)
    with pytest.raises(ConfigError, match="overflow in float16"):
        EngineCache(tmp_path).ensure(request, model)


def test_external_data_beyond_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The > 2 GB path on a tiny graph: weights in <name>.onnx.data, path-based checks, ORT loads it."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model = random_model("previewer_tiny", "fp32", seed=0, device="cpu")
    request = EngineRequest("previewer", "previewer_tiny", "onnxruntime", "fp32", "w", D256)
    cache = EngineCache(tmp_path)
    engine = cache.ensure(request, model)
    m = Manifest.read(cache.manifest_path(request))
    assert m.build["external_data"] and sorted(m.files) == sorted([m.engine_file, m.engine_file + ".data"])
    proto = onnx.load(tmp_path / m.engine_file, load_external_data=False)
    inline = [t.name for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) <= 1024 for t in proto.graph.initializer if t.name in inline)  # weights live outside
    assert m.validation["status"] == "passed"
    inputs = engine.spec.sample_inputs(D256, "fp32", seed=9)
    ref = run_graph(stage_graph("previewer", model), engine.spec, inputs)["preview"]
    assert output_errors(engine(inputs)["preview"], ref)["rel_l2"] <= 1e-5
