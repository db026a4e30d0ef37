"""`load_engine`, the entry point of the runtime's engine backends: build on first use, reuse afterwards."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from cascade_rt.export.loader import load_engine
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.sources import model_fingerprint, preset_of
from cascade_rt.models.presets import build_model


def test_preset_of_recognises_presets():
    assert preset_of(build_model("stage_a_tiny", seed=0)) == "stage_a_tiny"
    assert preset_of(build_model("stage_c_lite", device="meta")) == "stage_c_lite"
    odd = build_model("previewer_tiny", seed=0)
    odd.blocks[0] = torch.nn.Conv2d(16, 32, 3)
    assert preset_of(odd).startswith("custom-")


def test_load_engine_builds_then_reuses(tmp_path: Path):
    model = build_model("stage_a_tiny", seed=3, dtype=torch.bfloat16)  # ORT's CPU provider: built in fp32
    kw = dict(shapes=((1, 256, 256),), engine_dir=tmp_path, device="cpu", cfg=False, model_id="random-3")
    engine = load_engine("onnxruntime", "stage_a", model, **kw)
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock-"))
    name = f"stage_a-stage_a_tiny-{model_fingerprint(model)[6:16]}-fp32-b1-256x256-onnxruntime"
    assert files == [name + ".json", name + ".onnx"]
    m = Manifest.read(tmp_path / files[0])
    assert m.validation["status"] == "passed" and m.build["weights_source"] == {"model_id": "random-3"}
    latent = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
    out = engine({"latent": latent})["images"]  # bf16 in, cast to the engine's fp32
    ref = copy.deepcopy(model).float().decode(latent.float())
    assert out.dtype == torch.float32 and ((out - ref).norm() / ref.norm()) < 1e-5
    mtime = (tmp_path / files[1]).stat().st_mtime_ns
    load_engine("onnxruntime", "stage_a", model, **kw)
    assert (tmp_path / files[1]).stat().st_mtime_ns == mtime
