"""Shared fixtures for the export tests: one CLI export of every tiny stage, reused by several tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cascade_rt.cli import main

TINY_EXPORT = ["export", "--stage", "all", "--format", "onnx", "--preset", "tiny", "--random-weights",
               "--height", "256", "--width", "256"]  # fmt: skip


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
