"""StageSpec: shapes from (batch, height, width, cfg), profiles, binding, serialisation, cond_kv packing."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_rt.errors import ConfigError
from cascade_rt.export.build import EngineRequest, spec_for
from cascade_rt.export.graph_modules import pack_cond_kv, unpack_cond_kv
from cascade_rt.export.specs import Dims, StageSpec
from cascade_rt.stages import latent_shape, stage_b_latent_hw, stage_c_latent_hw


def test_latent_shapes_follow_spec_4_4():
    assert stage_c_latent_hw(1024, 1024) == (24, 24)
    assert stage_c_latent_hw(1536, 768) == (36, 18)
    assert stage_b_latent_hw(1024, 1024) == (256, 256)
    assert latent_shape("c", 2, 1024, 1024) == (2, 16, 24, 24)
    assert latent_shape("stage_b", 1, 1024, 1536) == (1, 4, 256, 384)
    with pytest.raises(ConfigError):
        latent_shape("effnet", 1, 1024, 1024)


@pytest.mark.parametrize("h,w,batch", [(1000, 1024, 1), (128, 1024, 1), (2176, 1024, 1), (1024, 1024, 5)])
def test_dims_refuse_unsupported_requests(h, w, batch):
    with pytest.raises(ConfigError):
        Dims(batch=batch, height=h, width=w)


def test_full_size_specs_from_meta_models():
    c = spec_for("stage_c", "stage_c")  # 3.6B on the meta device: no memory
    assert c.shapes(Dims(1, 1024, 1024, cfg=True)) == {
        "x": (2, 16, 24, 24), "r": (2,), "cond_kv": (64, 2, 2, 85, 2048), "eps": (2, 16, 24, 24)
    }
    b = spec_for("stage_b", "stage_b_lite")
    shapes = b.shapes(Dims(2, 1024, 1536, cfg=False))
    assert shapes["x"] == (2, 4, 256, 384) and shapes["x_add"] == (2, 320, 128, 192)
    assert shapes["cond_kv"] == (36, 2, 2, 4, 1152)
    assert spec_for("stage_c", "stage_c_lite").cfg("attn_widths") == (1536,) * 32


def test_profiles_static_and_dynamic():
    spec = spec_for("stage_c", "stage_c_tiny")
    static = spec.profile(Dims(1, 1024, 1024), dynamic=False)
    assert static["x"] == ((2, 16, 24, 24),) * 3
    lo, opt, hi = spec.profile(Dims(2, 1024, 1536), dynamic=True)["x"]
    assert lo == (1, 16, 6, 6) and opt == (4, 16, 24, 36) and hi == (8, 16, 48, 48)
    a = spec_for("stage_a", "stage_a_tiny").profile(Dims(1, 1024, 1024), dynamic=True)["latent"]
    assert a == ((1, 4, 64, 64), (1, 4, 256, 256), (4, 4, 512, 512))


def test_fp16_refused_for_the_denoisers_with_the_reason():
    for stage, preset in (("stage_c", "stage_c_tiny"), ("stage_c_cond", "stage_c_tiny"), ("stage_b", "stage_b_tiny")):
        with pytest.raises(ConfigError, match="overflow in float16.*6.1"):
            spec_for(stage, preset).check_precision("fp16")
    spec_for("stage_a", "stage_a_tiny").check_precision("fp16")  # allowed


def test_bind_reads_symbols_and_rejects_wrong_shapes():
    spec = spec_for("stage_b", "stage_b_tiny")
    inputs = spec.sample_inputs(Dims(1, 256, 384), "fp32")
    values = spec.bind(inputs)
    assert (values["N"], values["hb"], values["wb"]) == (2, 64, 96)
    assert spec.output_shapes(values) == {"eps": (2, 4, 64, 96)}
    bad = dict(inputs, x_add=inputs["x_add"][..., :-1])
    with pytest.raises(ConfigError, match="x_add"):
        spec.bind(bad)
    with pytest.raises(ConfigError, match="missing"):
        spec.bind({"x": inputs["x"]})


def test_spec_json_roundtrip():
    pairs = [("stage_c", "stage_c_tiny"), ("stage_b_cond", "stage_b_tiny"), ("previewer", "previewer_tiny"),
             ("text", "text_tiny")]
    for stage, preset in pairs:
        spec = spec_for(stage, preset)
        assert StageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_text_sample_inputs_have_eos_and_mask():
    spec = spec_for("text", "text_tiny")
    inputs = spec.sample_inputs(Dims(2, 256, 256), "fp32", seed=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (4, 77) and ids.dtype == torch.int64
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths):
        assert (row[n - 1 :] == spec.cfg("eos_id")).all() and (row[: n - 1] != spec.cfg("eos_id")).all()


def test_pack_unpack_roundtrip_mixed_widths():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 5, w, generator=g), torch.randn(2, 5, w, generator=g)) for w in (48, 64, 48)]
    packed = pack_cond_kv(pairs)
    assert packed.shape == (3, 2, 2, 5, 64)
    for (k, v), (k2, v2) in zip(pairs, unpack_cond_kv(packed, [48, 64, 48])):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ConfigError):
        unpack_cond_kv(packed, [48, 64])


def test_request_names_and_cfg_normalisation():
    r = EngineRequest("stage_a", "stage_a_tiny", "onnx", "fp32", "sha256:0123456789abcdef", Dims(1, 256, 256, cfg=True))
    assert r.dims.cfg is False and r.engine_file == "stage_a-stage_a_tiny-0123456789-fp32-b1-256x256-onnx.onnx"
    d = EngineRequest("stage_c", "stage_c_tiny", "tensorrt", "bf16", "model:fedcba9876543", Dims(1, 1024, 1024),
                      dynamic=True)
    assert d.name == "stage_c-stage_c_tiny-fedcba9876-bf16-dynamic-cfg-tensorrt" and d.onnx_source().format == "onnx"
    with pytest.raises(ConfigError):
        EngineRequest("stage_x", "p", "onnx", "fp32", "h")
