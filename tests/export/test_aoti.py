"""AOTInductor engines (CPU, gcc): Stage A's decoder and Stage C's denoiser compiled to .pt2 packages, validated
against eager, reloaded from their manifests without the model, and run on fresh inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cascade_rt.export.build import EngineRequest
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.graph_modules import run_graph, stage_graph
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.opener import open_engine
from cascade_rt.export.sources import random_source
from cascade_rt.export.specs import Dims
from cascade_rt.export.validate import output_errors, tolerance_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler"),
]
D = Dims(1, 256, 256)


@pytest.mark.parametrize("stage,preset", [("stage_a", "stage_a_tiny"), ("stage_c", "stage_c_tiny")])
def test_aoti_build_and_parity(tmp_path: Path, stage: str, preset: str):
    source = random_source(stage, preset, "fp32", seed=0)
    request = EngineRequest(stage, preset, "aoti", "fp32", source.weights_hash, D)
    cache = EngineCache(tmp_path)
    cache.ensure(request, source.model, options={"weights_source": source.record})
    m = Manifest.read(cache.manifest_path(request))
    assert m.validation["status"] == "passed" and m.engine_file.endswith(".pt2")
    assert m.device["type"] == "cpu" and m.device["name"]

    engine = open_engine(cache.manifest_path(request))  # a fresh load from the package: no model code involved
    graph = stage_graph(stage, source.model)
    inputs = engine.spec.sample_inputs(D, "fp32", seed=21)
    got, want = engine(inputs), run_graph(graph, engine.spec, inputs)
    for name in engine.spec.output_names:
        err = output_errors(got[name], want[name])
        assert err["rel_l2"] <= tolerance_for(engine.spec, "fp32")["rel_l2"], (name, err)
