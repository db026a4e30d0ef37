"""Shared fixtures for the export tests: one CLI export of every tiny stage, reused by several tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cascade_rt.cli import main

TINY_EXPORT = ["export", "--stage", "all", "--format", "onnx", "--preset", "tiny", "--random-weights",
               "--height", "256", "--width", "256"]


@pytest.fixture(scope="session")
def tiny_onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cascade-rt export --stage all --format onnx --preset tiny --random-weights` into a session directory."""
    root = tmp_path_factory.mktemp("engines")
    assert main([*TINY_EXPORT, "--engine-dir", str(root)]) == 0
    return root


@pytest.fixture
def engines_copy(tiny_onnx_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny engine cache, safe to tamper with."""
    dst = tmp_path / "engines"
    shutil.copytree(tiny_onnx_dir, dst)
    return dst


@pytest.fixture(scope="session")
def bf16_stage_b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Stage B (denoiser: ConvTranspose upscalers; conditioning: Resize) as bf16 ONNX graphs with dynamic
    shapes: what a TensorRT build starts from. ORT's CPU provider cannot run them (manifests say 'unvalidated')."""
    from cascade_rt.export.build import EngineRequest, random_model
    from cascade_rt.export.cache import EngineCache
    from cascade_rt.export.specs import Dims

    root = tmp_path_factory.mktemp("bf16")
    model = random_model("stage_b_tiny", "bf16", seed=0, device="cpu")
    cache = EngineCache(root)
    for stage in ("stage_b", "stage_b_cond"):
        cache.ensure(EngineRequest(stage, "stage_b_tiny", "onnx", "bf16", "w", Dims(1, 256, 256), dynamic=True), model)
    return root
