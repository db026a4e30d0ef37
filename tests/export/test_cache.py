"""Engine cache: reuse only on a full match, refusal with reasons, verify (sha256, versions, numerics), atomic
builds (a crash never leaves an engine that loads), validation failures, `cascade-rt engines`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cascade_rt.cli import main
from cascade_rt.errors import EngineError, NumericsError
from cascade_rt.export import build as build_mod
from cascade_rt.export import validate
from cascade_rt.export.build import EngineRequest
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.sources import random_source
from cascade_rt.export.specs import Dims

D = Dims(1, 256, 256)


def request_for(source, fmt: str = "onnxruntime", stage: str = "previewer") -> EngineRequest:
    return EngineRequest(stage, source.preset, fmt, "fp32", source.weights_hash, D)


@pytest.fixture(scope="module")
def previewer():
    return random_source("previewer", "previewer_tiny", "fp32", seed=0)


def verify_cli(root: Path, *extra: str) -> int:
    return main(["engines", "verify", "--engine-dir", str(root), *extra])


def test_verify_passes_then_fails_on_tampered_or_truncated_files(engines_copy: Path, capsys):
    assert verify_cli(engines_copy) == 0
    graph = next(engines_copy.glob("stage_a-*.onnx"))
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    graph.write_bytes(bytes(data))
    assert verify_cli(engines_copy, "--no-numerics") == 1
    assert "sha256 differs" in capsys.readouterr().out
    other = next(engines_copy.glob("previewer-*.onnx"))
    other.write_bytes(other.read_bytes()[:100])
    assert verify_cli(engines_copy) == 1
    out = capsys.readouterr().out
    assert "truncated" in out and out.count("FAIL") == 2


def test_verify_fails_when_versions_or_weights_changed(engines_copy: Path, capsys):
    path = next(engines_copy.glob("stage_c-*.json"))
    m = json.loads(path.read_text())
    m["versions"]["onnx"] = "0.0.1"
    path.write_text(json.dumps(m))
    assert verify_cli(engines_copy) == 1
    assert "onnx version: engine built with 0.0.1" in capsys.readouterr().out
    path = next(engines_copy.glob("stage_a-*.json"))
    m = json.loads(path.read_text())
    m["build"]["weights_source"]["random_seed"] = 1  # the engine no longer matches the weights it claims
    path.write_text(json.dumps(m))
    assert verify_cli(engines_copy) == 1
    assert "weights it was built from have changed" in capsys.readouterr().out


def test_reuse_refuse_and_rebuild(tmp_path: Path, previewer):
    cache = EngineCache(tmp_path)
    request = request_for(previewer)
    engine = cache.ensure(request, previewer.model, options={"weights_source": previewer.record})
    mtime = cache.engine_path(request).stat().st_mtime_ns
    assert cache.problems(request) == []
    cache.ensure(request, previewer.model)  # reused, not rebuilt
    assert cache.engine_path(request).stat().st_mtime_ns == mtime
    x = torch.randn(1, 16, 6, 6)
    assert engine({"latent": x})["preview"].shape == (1, 3, 48, 48)

    other = random_source("previewer", "previewer_tiny", "fp32", seed=1)  # other weights: another engine
    second = request_for(other)
    assert second.engine_file != request.engine_file  # the weights hash is part of the name: no shared slot
    with pytest.raises(EngineError, match="no engine built yet"):
        cache.load(second)
    cache.ensure(second, other.model)
    assert Manifest.read(cache.manifest_path(second)).weights_hash == other.weights_hash
    assert not cache.problems(request) and not cache.problems(second)  # both stay usable

    path = cache.manifest_path(second)  # a manifest whose name fits but whose weights do not: refused
    m = json.loads(path.read_text())
    m["weights_hash"] = previewer.weights_hash
    path.write_text(json.dumps(m))
    assert any(r.startswith("weights_hash: engine has") for r in cache.problems(second))


def test_foreign_versions_and_device_are_refused(tmp_path: Path, previewer):
    cache = EngineCache(tmp_path)
    request = request_for(previewer)
    cache.ensure(request, previewer.model)
    path = cache.manifest_path(request)
    m = json.loads(path.read_text())
    m["versions"]["onnxruntime"] = "1.0.0"
    path.write_text(json.dumps(m))
    with pytest.raises(EngineError, match="onnxruntime version: engine built with 1.0.0"):
        cache.load(request)
    aoti = Manifest.read(path)  # device-bound formats also compare the device
    aoti.format, aoti.device = "aoti", {"type": "cuda", "name": "NVIDIA H100", "compute_capability": "9.0"}
    want = build_mod.base_manifest(request, build_mod.spec_for("previewer", "previewer_tiny"))
    want.format = "aoti"
    assert any("device name" in r for r in aoti.mismatches(want))


def test_crash_mid_build_leaves_no_loadable_engine(tmp_path: Path, previewer, monkeypatch):
    def crashing_export(model, spec, path, **kw):
        Path(path).write_bytes(b"partial graph")  # half-written output, then the process "dies"
        raise RuntimeError("simulated crash inside the exporter")

    monkeypatch.setattr(build_mod, "export_onnx", crashing_export)
    cache = EngineCache(tmp_path)
    request = request_for(previewer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.ensure(request, previewer.model)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock-"))
    assert left == []  # scratch removed, nothing installed (only the builders' lock file stays)
    with pytest.raises(EngineError, match="no engine built yet"):
        cache.load(request)


def test_crash_before_the_manifest_is_written(tmp_path: Path, previewer, monkeypatch):
    cache = EngineCache(tmp_path)
    request = request_for(previewer)
    monkeypatch.setattr(Manifest, "write", lambda self, path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        cache.ensure(request, previewer.model)
    monkeypatch.undo()
    assert cache.engine_path(request).is_file() and not cache.manifest_path(request).exists()
    with pytest.raises(EngineError, match="no engine built yet"):
        cache.load(request)
    assert cache.clean() == [cache.engine_path(request)]


def test_validation_failure_is_loud_and_recorded(tmp_path: Path, previewer, monkeypatch):
    monkeypatch.setattr(validate, "tolerance_for", lambda spec, precision: {"rel_l2": 0.0})
    cache = EngineCache(tmp_path)
    request = request_for(previewer)
    with pytest.raises(NumericsError, match="failed validation.*rel_l2"):
        cache.ensure(request, previewer.model)
    monkeypatch.undo()
    m = Manifest.read(cache.manifest_path(request))
    assert m.validation["status"] == "failed" and m.validation["errors"]
    with pytest.raises(EngineError, match="validation failed"):
        cache.load(request)


def test_engines_list_and_clean_cli(engines_copy: Path, capsys):
    assert main(["engines", "list", "--engine-dir", str(engines_copy)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and all(r["validation"] == "passed" for r in rows)
    (engines_copy / ".build-leftover.abc").mkdir()
    orphan = "stage_a-stage_a_tiny-0123456789-fp32-b1-256x256-onnxruntime.onnx"  # an engine no manifest lists
    (engines_copy / orphan).write_bytes(b"x")
    (engines_copy / "notes.onnx").write_bytes(b"mine")  # not a name the cache makes: never touched
    assert main(["engines", "clean", "--engine-dir", str(engines_copy)]) == 0
    out = capsys.readouterr().out
    assert orphan in out and ".build-leftover" in out and len(list(engines_copy.glob("*.json"))) == 8
    assert "notes.onnx" not in out
    assert main(["engines", "clean", "--all", "--engine-dir", str(engines_copy)]) == 0
    assert [p.name for p in engines_copy.iterdir()] == ["notes.onnx"]


def test_export_from_a_weights_folder_and_verify_notices_new_weights(tmp_path: Path, save_official, capsys):
    from cascade_rt.models.presets import build_model

    weights, root = tmp_path / "weights", tmp_path / "engines"
    weights.mkdir()
    save_official(build_model("stage_a_tiny", seed=1), weights / "stage_a.safetensors")
    argv = ["export", "--stage", "a", "--format", "onnxruntime", "--weights", str(weights),
            "--height", "256", "--width", "256", "--engine-dir", str(root)]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert re.fullmatch(r"stage_a-stage_a_tiny-[0-9a-f]{10}-fp32-b1-256x256-onnxruntime\.onnx", rows[0]["engine"])
    assert Manifest.read(next(root.glob("*.json"))).build["weights_source"]["weights"].endswith("stage_a.safetensors")
    assert verify_cli(root) == 0
    save_official(build_model("stage_a_tiny", seed=2), weights / "stage_a.safetensors")  # the weights changed
    assert verify_cli(root) == 1
    assert "missing or changed" in capsys.readouterr().out
