"""LoRA + ControlNet through load_pipeline and the CLI (tiny random models): the wiring equals a pipeline with the
official LoRA parametrization and the ControlNet's projections; compile / onnxruntime / aoti agree with eager; the
engine cache keys on the LoRA; switching LoRAs is an in-place weight swap."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cascade_rt
from cascade_rt.cli import main
from cascade_rt.errors import ConfigError
from cascade_rt.extensions import Extensions, parse_lora, switch_loras
from cascade_rt.models.controlnet import build_controlnet
from cascade_rt.models.lora import attach_official, load_lora, random_lora, save_lora
from cascade_rt.pipeline import build_random_pipeline
from cascade_rt.runtime import relative_error

FAST = dict(height=256, width=256, steps_c=2, steps_b=1)
# fp32, tiny, 2 Stage C steps: measured ~2e-5 (Stage C latent) for compile, aoti and onnxruntime
BACKEND_TOLERANCE_FP32 = 1e-3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext")
    stage_c = build_random_pipeline("tiny", dtype=torch.float32).stage_c
    loras = [save_lora(random_lora(stage_c, seed=s, std=0.2), root / f"lora{s}.safetensors") for s in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    image = root / "control.png"
    Image.fromarray((torch.rand(256, 256, 3, generator=gen) * 255).byte().numpy()).save(image)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 160))
    mask.save(root / "mask.png")
    return {"lora": loras, "image": image, "mask": root / "mask.png", "root": root}


def _load(**kw):
    return cascade_rt.load_pipeline(random_weights=True, preset="tiny", device="cpu", dtype=torch.float32, **kw)


def _control(files):
    return dict(control_image=Image.open(files["image"]).convert("RGB"), mask=Image.open(files["mask"]))


def test_parse_lora():
    assert parse_lora("a/b.safetensors") == parse_lora(("a/b.safetensors",))
    assert parse_lora("a/b.safetensors:0.5").scale == 0.5 and parse_lora("c:/x.st:-1").path == "c:/x.st"
    assert parse_lora("weird:name.safetensors").path == "weird:name.safetensors"


@torch.no_grad()
def test_pipeline_equals_official_lora_and_controlnet(files):
    pipe = _load(lora=[f"{files['lora'][0]}:0.7", str(files["lora"][1])], controlnet="inpainting")
    out = pipe("a cat", seed=5, control_strength=0.8, **_control(files), **FAST)
    # reference: the official parametrization on a fresh eager pipeline, the same (seeded) ControlNet
    ref = build_random_pipeline("tiny", dtype=torch.float32)
    loras = [load_lora(files["lora"][0], ref.stage_c, scale=0.7), load_lora(files["lora"][1], ref.stage_c)]
    attach_official(ref.stage_c, loras)
    ref.extensions = Extensions(controlnet=build_controlnet("inpainting", ref.stage_c, seed=7), control="inpainting")
    want = ref("a cat", seed=5, control_strength=0.8, **_control(files), **FAST)
    assert torch.equal(out.stage_c_latent, want.stage_c_latent) and torch.equal(out.pixels, want.pixels)
    plain = build_random_pipeline("tiny", dtype=torch.float32)("a cat", seed=5, **FAST)
    assert relative_error(out.stage_c_latent, plain.stage_c_latent) > 0.05  # both extensions change the image
    assert pipe.extensions.describe()["lora"][0]["scale"] == 0.7
    assert pipe.extensions.describe()["controlnet"] == {"kind": "inpainting", "blocks": [0, 5]}
    assert pipe.extensions.controlnet_source == "random:seed=7"


def test_bad_control_requests(files):
    pipe = _load()
    with pytest.raises(ConfigError, match="control image needs a ControlNet"):
        pipe("a cat", control_image=Image.open(files["image"]), **FAST)
    canny = _load(controlnet="sr")
    with pytest.raises(ConfigError, match="mask is only used by the inpainting ControlNet"):
        canny("a cat", **_control(files), **FAST)
    with pytest.raises(ConfigError, match="needs its checkpoint: --controlnet-weights canny.safetensors"):
        from cascade_rt.extensions import attach_extensions

        attach_extensions(build_random_pipeline("tiny"), controlnet="canny", random_weights=False)


@torch.no_grad()
def test_switch_loras_in_place_is_exact(files):
    pipe = _load(lora=[str(files["lora"][0])])
    base = _load()
    stage_c = pipe.runners["c"].model
    ptrs = [p.data_ptr() for p in stage_c.parameters()]
    first = pipe("a cat", seed=1, **FAST).stage_c_latent
    seconds = switch_loras(pipe, [f"{files['lora'][1]}:0.5"])
    assert seconds >= 0 and pipe.extensions.switch_seconds[-1] == seconds
    assert not torch.equal(pipe("a cat", seed=1, **FAST).stage_c_latent, first)
    switch_loras(pipe, [str(files["lora"][0])])
    assert torch.equal(pipe("a cat", seed=1, **FAST).stage_c_latent, first)
    switch_loras(pipe, [])
    assert torch.equal(pipe("a cat", seed=1, **FAST).stage_c_latent, base("a cat", seed=1, **FAST).stage_c_latent)
    assert [p.data_ptr() for p in stage_c.parameters()] == ptrs


def _cli(files, out, backend, engine_dir, *extra, control="inpainting"):
    mask = ["--mask", str(files["mask"])] if control == "inpainting" else []
    args = ["generate", "a cat", "--random-weights", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32",
            "--height", "256", "--width", "256", "--steps-c", "2", "--steps-b", "1", "--seed", "4",
            "--lora", f"{files['lora'][0]}:0.8", "--controlnet", control, "--control-image", str(files["image"]),
            *mask, "--control-strength", "0.9", "--backend", f"c={backend}",
            "--engine-dir", str(engine_dir), "-o", str(out), *extra]
    assert main(args) == 0
    return np.asarray(Image.open(out), dtype=np.int16), json.loads(Image.open(out).text["cascade-rt"])


@pytest.mark.slow
@pytest.mark.parametrize("control", ["inpainting", "canny"])
@pytest.mark.parametrize("backend", ["onnxruntime", "compile", "aoti"])
def test_cli_lora_controlnet_backends_agree_with_eager(files, tmp_path, backend, control):
    if control == "canny":
        pytest.importorskip("cv2", reason="canny needs opencv-python-headless (the controlnet extra)")
    eager, meta = _cli(files, tmp_path / "eager.png", "eager", tmp_path / "engines", control=control)
    assert meta["extensions"]["lora"][0]["scale"] == 0.8 and meta["control_strength"] == 0.9
    got, _ = _cli(files, tmp_path / f"{backend}.png", backend, tmp_path / "engines", control=control)
    assert np.abs(got - eager).max() <= 2, np.abs(got - eager).max()  # 8-bit pixels; ~2e-5 in the latent
    if backend != "compile":  # the engine's name and manifest carry the LoRA and the ControlNet
        manifests = [json.loads(p.read_text()) for p in (tmp_path / "engines").glob("stage_c_cnet-*.json")]
        assert len(manifests) == 1 and "-ext-" in manifests[0]["engine_file"]
        ext = manifests[0]["extensions"]
        assert ext["lora"][0]["file"] == str(files["lora"][0]) and ext["lora"][0]["scale"] == 0.8
        assert ext["controlnet"]["blocks"] == [0, 5] and ext["controlnet"]["kind"] == control


@pytest.mark.slow
def test_engine_cache_keys_on_the_lora(files, tmp_path):
    """Another scale or file: another engine (never a stale one); the same: reused. No control image on a
    ControlNet engine: zero projections, i.e. the plain LoRA model."""
    kw = dict(backend="c=onnxruntime", engine_dir=tmp_path, engine_shapes=((1, 256, 256),), controlnet="inpainting")
    a = _load(lora=[f"{files['lora'][0]}:0.8"], **kw)
    _load(lora=[f"{files['lora'][0]}:0.8"], **kw)  # reused
    b = _load(lora=[f"{files['lora'][0]}:0.5"], **kw)
    names = sorted(p.name for p in tmp_path.glob("stage_c_cnet-*.json"))
    assert len(names) == 2
    out_a, out_b = a("a cat", seed=2, **FAST), b("a cat", seed=2, **FAST)
    for out, scale in ((out_a, 0.8), (out_b, 0.5)):
        eager = _load(lora=[f"{files['lora'][0]}:{scale}"])("a cat", seed=2, **FAST)
        assert relative_error(out.stage_c_latent, eager.stage_c_latent) <= BACKEND_TOLERANCE_FP32
    assert relative_error(out_a.stage_c_latent, out_b.stage_c_latent) > 5 * BACKEND_TOLERANCE_FP32
    engines = sorted(tmp_path.glob("stage_c_cnet-*"))
    switch_loras(a, [f"{files['lora'][0]}:0.5"])  # the 0.8 engine's session, with the 0.5 weights overridden
    assert torch.equal(a("a cat", seed=2, **FAST).stage_c_latent, out_b.stage_c_latent)  # = the 0.5 export
    assert sorted(tmp_path.glob("stage_c_cnet-*")) == engines  # nothing written: the files keep their LoRA


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the triton backend on the CPU through Triton's interpreter (TRITON_INTERPRET=1 is not set)",
)
def test_triton_backend_with_lora_and_controlnet(files):
    kw = dict(lora=[f"{files['lora'][0]}:0.8"], controlnet="inpainting")
    out = _load(backend="c=triton", **kw)("a cat", seed=6, **_control(files), **FAST)
    ref = _load(**kw)("a cat", seed=6, **_control(files), **FAST)
    assert relative_error(out.stage_c_latent, ref.stage_c_latent) <= BACKEND_TOLERANCE_FP32  # measured ~6e-7


@pytest.mark.slow
def test_export_cli_with_lora_and_controlnet_is_what_the_runtime_reuses(files, tmp_path):
    """`cascade-rt export --lora --controlnet` builds stage_c_cond, stage_c and the stage_c_cnet variant with the
    LoRA merged; load_pipeline with the same LoRA and ControlNet (same seeded weights) reuses the variant."""
    lora = f"{files['lora'][0]}:0.8"
    argv = ["export", "--stage", "c", "--format", "onnxruntime", "--preset", "tiny", "--random-weights",
            "--lora", lora, "--controlnet", "inpainting", "--dynamic", "--height", "256", "--width", "256",
            "--engine-dir", str(tmp_path)]
    assert main(argv) == 0  # the random Stage C that load_pipeline(random_weights=True) builds
    manifests = {p.name.split("-")[0]: p for p in tmp_path.glob("*.json")}
    assert set(manifests) == {"stage_c_cond", "stage_c", "stage_c_cnet"}
    cnet = json.loads(manifests["stage_c_cnet"].read_text())
    assert cnet["extensions"]["controlnet"] == {"kind": "inpainting", "blocks": [0, 5]}
    assert cnet["extensions"]["lora"][0]["scale"] == 0.8 and "cnet" in [t["name"] for t in cnet["spec"]["inputs"]]
    assert json.loads(manifests["stage_c"].read_text())["extensions"].keys() == {"lora"}
    stamp = manifests["stage_c_cnet"].stat().st_mtime_ns
    pipe = _load(backend="c=onnxruntime", engine_dir=tmp_path, engine_shapes=((1, 256, 256),), lora=[lora],
                 controlnet="inpainting")
    assert manifests["stage_c_cnet"].stat().st_mtime_ns == stamp  # reused, not rebuilt
    out = pipe("a cat", seed=3, **_control(files), **FAST)
    ref = _load(lora=[lora], controlnet="inpainting")("a cat", seed=3, **_control(files), **FAST)
    assert relative_error(out.stage_c_latent, ref.stage_c_latent) <= BACKEND_TOLERANCE_FP32


def test_cli_canny_runs_or_names_the_missing_package(files, tmp_path, capsys):
    argv = ["generate", "a cat", "--random-weights", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32",
            "--height", "256", "--width", "256", "--steps-c", "2", "--steps-b", "1", "--seed", "4",
            "--lora", str(files["lora"][0]), "--controlnet", "canny", "--control-image", str(files["image"]),
            "-o", str(tmp_path / "canny.png")]
    try:
        import cv2  # noqa: F401
    except ImportError:
        assert main(argv) == 2
        assert "pip install opencv-python-headless" in capsys.readouterr().err
        return
    assert main(argv) == 0 and (tmp_path / "canny.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")
def test_gpu_cuda_graphs_follow_an_in_place_lora_switch(files):
    """Captured Stage C graphs keep reading the same weight storage: after switch_loras they compute the new LoRA
    (no recapture), with the ControlNet's projections copied into the static inputs."""
    kw = dict(random_weights=True, preset="tiny", device="cuda", dtype=torch.bfloat16, controlnet="inpainting",
              lora=[str(files["lora"][0])])
    pipe, eager = cascade_rt.load_pipeline(**kw), cascade_rt.load_pipeline(cuda_graphs=False, **kw)
    run = dict(seed=0, height=512, width=512, steps_c=20, steps_b=10, **_control(files))
    assert relative_error(pipe("a cat", **run).pixels, eager("a cat", **run).pixels) <= 1e-3
    captures = pipe.graphed["c"].stats["captures"]
    seconds = [switch_loras(p, [f"{files['lora'][1]}:0.5"]) for p in (pipe, eager)]
    assert relative_error(pipe("a cat", **run).pixels, eager("a cat", **run).pixels) <= 1e-3, seconds
    assert pipe.graphed["c"].stats["captures"] == captures


@pytest.mark.slow
def test_compiled_stage_c_follows_an_in_place_lora_switch(files):
    """torch.compile reads the live parameters: after switch_loras it computes the new LoRA, no recompilation."""
    c, e = _load(backend="c=compile", lora=[str(files["lora"][0])]), _load(lora=[str(files["lora"][0])])
    before = e("a cat", seed=3, **FAST).stage_c_latent
    assert relative_error(c("a cat", seed=3, **FAST).stage_c_latent, before) <= BACKEND_TOLERANCE_FP32
    for pipe in (c, e):
        switch_loras(pipe, [f"{files['lora'][1]}:0.5"])
    after = e("a cat", seed=3, **FAST).stage_c_latent
    assert relative_error(after, before) > 10 * BACKEND_TOLERANCE_FP32  # the switch matters
    assert relative_error(c("a cat", seed=3, **FAST).stage_c_latent, after) <= BACKEND_TOLERANCE_FP32


@torch.no_grad()
def test_retoken_reaches_the_text_encoder(tmp_path):
    """A LoRA's ReToken rows change the prompts that use those tokens, and only those; removing it is exact."""
    base = build_random_pipeline("tiny", dtype=torch.float32)
    ids, _ = base.text_encoder.tokenizer(["a cat"])
    tokens = [int(i) for i in ids[0, 1:3]]  # 'a', 'cat'
    width = base.text_encoder.tower.token_embedding.weight.shape[1]
    lora = random_lora(base.stage_c, seed=9, std=0.5, token_indices=tokens, token_dim=width)
    pipe = _load(lora=[str(save_lora(lora, tmp_path / "retoken.safetensors"))])
    with_tokens, without = pipe.text_encoder.encode(["a cat"]), pipe.text_encoder.encode(["xyz"])
    assert (with_tokens[0] - base.text_encoder.encode(["a cat"])[0]).abs().max() > 1e-2
    assert torch.equal(without[0], base.text_encoder.encode(["xyz"])[0])
    switch_loras(pipe, [])
    assert torch.equal(pipe.text_encoder.encode(["a cat"])[0], base.text_encoder.encode(["a cat"])[0])


def test_serve_loads_the_lora_for_every_request(files):
    """`cascade-rt serve --lora` reaches load_pipeline through the shared model options (uvicorn and Ray)."""
    import argparse

    from cascade_rt.commands import serve
    from cascade_rt.commands.generate import load_from_args

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--random-weights", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32",
                              "--lora", f"{files['lora'][1]}:0.3"])
    pipe = load_from_args(args)
    assert pipe.extensions.describe()["lora"][0]["scale"] == 0.3
    ref = _load(lora=[f"{files['lora'][1]}:0.3"])
    assert torch.equal(pipe("a cat", seed=1, **FAST).stage_c_latent, ref("a cat", seed=1, **FAST).stage_c_latent)
