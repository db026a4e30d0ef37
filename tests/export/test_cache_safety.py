"""The engine cache under hostile or careless use: it never deletes what it did not make, never loads a file from
outside its folder, never reuses an engine for other weights or runs one at a shape it was not built for, and
treats a malformed manifest as a broken engine, not a crash. Each test reproduces a case that once went wrong."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from cascade_rt.cli import main
from cascade_rt.errors import EngineError
from cascade_rt.export import build as build_mod
from cascade_rt.export.build import EngineRequest
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.engine import EngineShapeError
from cascade_rt.export.loader import load_engine
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.sources import model_fingerprint, random_source
from cascade_rt.export.specs import Dims
from cascade_rt.models.presets import build_model

D = Dims(1, 256, 256)


@pytest.fixture(scope="module")
def previewer():
    return random_source("previewer", "previewer_tiny", "fp32", seed=0)


@pytest.fixture(scope="module")
def built(previewer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One static ONNX Runtime previewer engine (batch 1, 256x256), built once; tests copy the folder."""
    root = tmp_path_factory.mktemp("engines")
    EngineCache(root).ensure(EngineRequest("previewer", previewer.preset, "onnxruntime", "fp32",
                                           previewer.weights_hash, D), previewer.model)
    return root


@pytest.fixture
def cache_dir(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "engines"
    shutil.copytree(built, dst)
    return dst


def request_for(source) -> EngineRequest:
    return EngineRequest("previewer", source.preset, "onnxruntime", "fp32", source.weights_hash, D)


# --- 1. clean removes only what the cache made ------------------------------------------------------------------
def test_clean_never_touches_a_folder_that_is_not_an_engine_cache(tmp_path: Path, capsys):
    junk = tmp_path / "junk"
    (junk / "src").mkdir(parents=True)
    (junk / "thesis.txt").write_text("x")
    (junk / "src" / "main.py").write_text("print(1)")
    assert main(["engines", "clean", "--engine-dir", str(junk)]) == 0
    assert main(["engines", "clean", "--all", "--engine-dir", str(junk)]) == 0
    assert (junk / "thesis.txt").read_text() == "x" and (junk / "src" / "main.py").is_file()


def test_clean_dry_run_lists_and_clean_removes_only_cache_leftovers(cache_dir: Path, capsys):
    orphan = cache_dir / "stage_c-stage_c_tiny-0123456789-fp32-dynamic-onnx.onnx"
    orphan.write_bytes(b"x")
    scratch = cache_dir / ".build-stage_c-x.abc"
    scratch.mkdir()
    (cache_dir / "stage_c_notes").mkdir()  # a folder of the user's, engine-like name: never entered
    (cache_dir / "stage_c_notes" / "a.onnx").write_bytes(b"keep")
    before = sorted(p.name for p in cache_dir.iterdir())
    assert main(["engines", "clean", "--dry-run", "--engine-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert f"would remove {orphan}" in out and f"would remove {scratch}" in out and out.count("would remove") == 2
    assert sorted(p.name for p in cache_dir.iterdir()) == before  # dry run: nothing removed
    assert main(["engines", "clean", "--engine-dir", str(cache_dir)]) == 0
    assert not orphan.exists() and not scratch.exists()
    assert (cache_dir / "stage_c_notes" / "a.onnx").read_bytes() == b"keep"
    assert len(list(cache_dir.glob("previewer-*.json"))) == 1  # the valid engine stays


def test_engine_dir_that_is_a_file_is_refused_before_any_build(tmp_path: Path, previewer):
    a_file = tmp_path / "engines"
    a_file.write_text("not a folder")
    with pytest.raises(EngineError, match="is a file"):
        EngineCache(a_file).ensure(request_for(previewer), previewer.model)
    for action in ("clean", "list", "verify"):
        assert main(["engines", action, "--engine-dir", str(a_file)]) == 2
    assert a_file.read_text() == "not a folder"


def test_read_only_engine_dir_is_refused_before_any_build(tmp_path: Path, previewer):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only folders; the read-only check is tested as a normal user")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(EngineError, match="not writable"):
            EngineCache(read_only).ensure(request_for(previewer), previewer.model)
    finally:
        read_only.chmod(0o755)


# --- 2. an engine runs only the shapes it was built for ---------------------------------------------------------
def test_static_engine_refuses_another_batch_or_size(cache_dir: Path, previewer):
    engine = EngineCache(cache_dir).load(request_for(previewer))
    x = torch.randn(1, 16, 6, 6)
    assert engine({"latent": x})["preview"].shape == (1, 3, 48, 48)
    for bad in (torch.randn(2, 16, 6, 6), torch.randn(1, 16, 8, 6)):
        with pytest.raises(EngineShapeError, match=r"static engine for batch 1 at 256x256.*this call has") as e:
            engine({"latent": bad})
        assert "engine_shapes" in str(e.value) and "--dynamic" in str(e.value)


@pytest.mark.slow
def test_runtime_with_a_static_aoti_engine_refuses_a_batch_it_was_not_built_for(tmp_path: Path):
    from cascade_rt.runtime.api import load_pipeline

    kw = dict(random_weights=True, preset="tiny", device="cpu", dtype=torch.float32, engine_dir=tmp_path)
    pipe = load_pipeline(backend="c=aoti,b=eager,a=eager", engine_shapes=((1, 256, 256),), **kw)
    run = dict(height=256, width=256, steps_c=2, steps_b=1, seed=5)
    eager = load_pipeline(backend="eager", **kw)
    assert (pipe("cat", **run).pixels - eager("cat", **run).pixels).abs().max() < 1e-3  # the shape it was built for
    with pytest.raises(EngineShapeError, match="static engine for batch 1 at 256x256"):
        pipe("cat", images_per_prompt=2, **run)  # silently wrong before: differed from eager by 1.0
    with pytest.raises(EngineShapeError, match="static engine"):
        pipe("cat", **{**run, "height": 384})


# --- 3. a changed weight never reuses the old engine ------------------------------------------------------------
def test_one_changed_element_gives_a_new_fingerprint_and_a_new_engine(tmp_path: Path):
    model = build_model("previewer_tiny", seed=0)
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first  # remembered while nothing changed
    first_conv = model.blocks[0].weight.view(-1)  # 512 elements
    sampled = torch.arange(256) * (first_conv.numel() - 1) // 255  # what the old 256-sample fingerprint read
    unsampled = next(i for i in range(first_conv.numel()) if i not in set(sampled.tolist()))
    with torch.no_grad():
        first_conv[unsampled] += 0.25
    assert model_fingerprint(model) != first
    weight = model.blocks[-1].weight  # the output conv: a change shows in the output directly
    kw = dict(shapes=((1, 256, 256),), engine_dir=tmp_path, device="cpu", cfg=False)
    x = torch.randn(1, 16, 6, 6)
    out = load_engine("onnxruntime", "previewer", model, **kw)({"latent": x})["preview"]
    assert torch.allclose(out, model(x), atol=1e-4)  # follows the changed weights
    with torch.no_grad():
        weight.view(-1)[3] += 5.0
    ref = model(x)
    assert (ref - out).abs().max() > 1e-2  # the change is visible in the output
    out2 = load_engine("onnxruntime", "previewer", model, **kw)({"latent": x})["preview"]
    assert torch.allclose(out2, ref, atol=1e-4)
    assert len(list(tmp_path.glob("previewer-*.json"))) == 2  # one engine per weights, no shared slot


# --- 6/7. manifests: files inside the folder, the right shape ---------------------------------------------------
def _manifest_path(root: Path) -> Path:
    return next(root.glob("previewer-*.json"))


@pytest.mark.parametrize("name", ["../outside.onnx", "/tmp/outside.onnx", "sub/dir.onnx"])
def test_manifest_naming_a_file_outside_the_engine_folder_is_refused(cache_dir: Path, previewer, name, capsys):
    path = _manifest_path(cache_dir)
    m = json.loads(path.read_text())
    real = m["engine_file"]
    outside = (cache_dir / name) if not name.startswith("/") else Path(name)
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(cache_dir / real, outside)  # same bytes: the sha256 matches
    m["files"] = {name: m["files"][real]}
    m["engine_file"] = name
    path.write_text(json.dumps(m))
    cache = EngineCache(cache_dir)
    assert any("not a plain file name" in r for r in cache.problems(request_for(previewer)))
    with pytest.raises(EngineError, match="not a plain file name"):
        cache.load(request_for(previewer))
    assert main(["engines", "verify", "--no-numerics", "--engine-dir", str(cache_dir)]) == 1
    assert "not a plain file name" in capsys.readouterr().out


def test_engine_file_symlinked_outside_the_folder_is_refused(cache_dir: Path, previewer, tmp_path: Path):
    m = Manifest.read(_manifest_path(cache_dir))
    target = tmp_path / "elsewhere.onnx"
    shutil.move(cache_dir / m.engine_file, target)
    (cache_dir / m.engine_file).symlink_to(target)
    with pytest.raises(EngineError, match="resolves outside the engine folder"):
        EngineCache(cache_dir).load(request_for(previewer))


@pytest.mark.parametrize("content", ["[1, 2]", '{"files": "abc"}', '{"stage": 3}', "null"])
def test_manifest_of_the_wrong_shape_is_a_broken_engine_not_a_crash(cache_dir: Path, previewer, content, capsys):
    path = _manifest_path(cache_dir)
    good = path.read_text()
    path.write_text(content)
    assert main(["engines", "list", "--engine-dir", str(cache_dir)]) == 0
    assert "error" in json.loads(capsys.readouterr().out)[0]
    assert main(["engines", "verify", "--engine-dir", str(cache_dir)]) == 1
    assert "FAIL" in capsys.readouterr().out
    cache = EngineCache(cache_dir)
    assert cache.problems(request_for(previewer))[0].startswith("unreadable manifest")
    cache.ensure(request_for(previewer), previewer.model)  # rebuilt, then usable
    assert Manifest.read(path).weights_hash == previewer.weights_hash and path.read_text() != good
    assert not cache.problems(request_for(previewer))


# --- 10. verify checks the environment without numerics, the weights, and leftovers ---------------------------
def test_verify_no_numerics_still_checks_the_environment(cache_dir: Path, capsys):
    path = _manifest_path(cache_dir)
    m = json.loads(path.read_text())
    m["versions"]["onnxruntime"] = "0.0.1"
    path.write_text(json.dumps(m))
    assert main(["engines", "verify", "--no-numerics", "--engine-dir", str(cache_dir)]) == 1
    assert "onnxruntime version: engine built with 0.0.1" in capsys.readouterr().out


def test_verify_compares_the_recorded_weights_with_the_weights(cache_dir: Path, capsys):
    path = _manifest_path(cache_dir)
    m = json.loads(path.read_text())
    m["build"]["weights_source"] = {"random_seed": 6}  # the previewer's own seed: its weights hash matches
    path.write_text(json.dumps(m))
    assert main(["engines", "verify", "--no-numerics", "--engine-dir", str(cache_dir)]) == 0
    m["build"]["weights_source"] = {"random_seed": 7}  # not the weights this engine records
    path.write_text(json.dumps(m))
    assert main(["engines", "verify", "--no-numerics", "--engine-dir", str(cache_dir)]) == 1
    assert "have changed" in capsys.readouterr().out


def test_verify_reports_orphans_and_scratch_leftovers(cache_dir: Path, capsys):
    (cache_dir / ".build-previewer-x.abc").mkdir()
    assert main(["engines", "verify", "--no-numerics", "--engine-dir", str(cache_dir)]) == 1
    assert "LEFTOVER .build-previewer-x.abc" in capsys.readouterr().out


# --- 11. the cache is usable: export serves generate, builders wait for each other ------------------------------
def test_export_random_weights_builds_the_engine_generate_uses(tmp_path: Path, capsys):
    from cascade_rt.runtime.api import load_pipeline

    argv = ["export", "--stage", "a", "--format", "onnxruntime", "--preset", "tiny", "--random-weights",
            "--dynamic", "--dtype", "fp32", "--engine-dir", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    manifests = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    load_pipeline(random_weights=True, preset="tiny", device="cpu", dtype=torch.float32, backend="a=onnxruntime",
                  engine_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == manifests  # reused, not rebuilt


def test_concurrent_builders_of_one_engine_build_it_once(tmp_path: Path, previewer, monkeypatch):
    calls = []
    real = build_mod.build_files

    def slow_build(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr("cascade_rt.export.cache.build_files", slow_build)
    errors = []

    def worker():
        try:
            EngineCache(tmp_path).ensure(request_for(previewer), previewer.model)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"builder-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
