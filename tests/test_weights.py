"""Checkpoint loading: official files, the diffusers layout, conversion both ways, discovery, errors, hashing.

Tiny random models are saved in the real formats (safetensors as the official code and diffusers write them).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade_rt import cli
from cascade_rt.checkpoint_io import ShardedSource
from cascade_rt.convert import convert_to_diffusers, convert_to_official
from cascade_rt.diffusers_format import config_to_kwargs, full_kwargs, kwargs_to_config
from cascade_rt.errors import WeightsError
from cascade_rt.models import PRESETS, build_model, get_preset
from cascade_rt.weights import (
    find_text_encoder,
    find_weights,
    from_diffusers,
    load_pipeline_models,
    load_stage,
    to_diffusers,
    weights_hash,
)

BF16, FP32 = torch.bfloat16, torch.float32
TINY = {"stage_c_tiny": ("c", "stage_c", 11), "stage_b_tiny": ("b", "stage_b", 12),
        "stage_a_tiny": ("a", "stage_a", 13), "previewer_tiny": ("previewer", "previewer", 14)}


@pytest.fixture(scope="module")
def tiny():
    return {name: build_model(name, seed=seed) for name, (_, _, seed) in TINY.items()}


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, tiny, save_official):
    """stage_c{,_bf16}, stage_b{,_bf16}, stage_a, previewer: the official names, tiny contents."""
    root = tmp_path_factory.mktemp("official")
    for name, (_, stem, _) in TINY.items():
        save_official(tiny[name], root / f"{stem}.safetensors")
        if stem in ("stage_c", "stage_b"):
            save_official(tiny[name], root / f"{stem}_bf16.safetensors", BF16)
    return root


def forward(model, name):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if name.startswith("stage_c"):
            x, r = torch.randn(1, 16, 4, 3, generator=g), torch.rand(1, generator=g)
            return model(x, r, *(torch.randn(1, n, c, generator=g) for n, c in ((5, 32), (1, 32), (1, 24))))
        if name.startswith("stage_b"):
            return model(torch.randn(1, 4, 32, 32, generator=g), torch.rand(1, generator=g),
                         torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 1, 32, generator=g))
        if name.startswith("stage_a"):
            return model.decode(torch.randn(1, 4, 8, 8, generator=g))
        return model(torch.randn(1, 16, 3, 3, generator=g))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------ official files
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("file_dtype, dtype", [(FP32, FP32), (BF16, BF16), (BF16, FP32)])
def test_official_file_loads_strictly(tmp_path, tiny, save_official, name, file_dtype, dtype):
    stage = TINY[name][0]
    path = save_official(tiny[name], tmp_path / "w.safetensors", file_dtype)
    loaded = load_stage(stage, path, dtype=dtype)  # the tiny preset is recognised from the shapes
    expected = copy.deepcopy(tiny[name]).to(file_dtype).to(dtype)  # rounded through the file's dtype
    assert_same_state(loaded, expected)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    # owned, aligned allocations (a view into the mapped file can sit at any offset; CPU kernels then round
    # differently), so the loaded model computes exactly what the same weights in memory compute
    assert all(t.data_ptr() % 64 == 0 for t in [*loaded.parameters(), *loaded.buffers()] if t.numel())
    assert torch.equal(forward(loaded, name), forward(expected, name))
    assert_same_state(load_stage(name, path, dtype=dtype), expected)  # by preset name too


def test_batchnorm_buffers_keep_integer_dtype(official_dir):
    model = load_stage("a", official_dir / "stage_a.safetensors", dtype=BF16)
    assert model.down_blocks[-1][1].num_batches_tracked.dtype == torch.int64
    assert model.down_blocks[-1][1].running_var.dtype == BF16


def test_torch_pickle_with_state_dict_wrapper(tmp_path, tiny):
    torch.save({"state_dict": tiny["stage_c_tiny"].state_dict()}, tmp_path / "stage_c.pt")  # official load_or_fail
    assert_same_state(load_stage("c", tmp_path / "stage_c.pt"), tiny["stage_c_tiny"])


# ------------------------------------------------------------------------------------------ diffusers layout
def test_state_dict_conversion_round_trip_is_exact(tiny):
    for name in ("stage_c_tiny", "stage_b_tiny", "stage_a_tiny"):
        sd = tiny[name].state_dict()
        d = to_diffusers(sd)
        assert any(".attention.to_q." in k for k in d) or name == "stage_a_tiny"
        assert (
            ("clip_txt_pooled_mapper.weight" in d) and ("clip_mapper.weight" not in d)
            if name == "stage_b_tiny"
            else True
        )
        back = from_diffusers(d)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_round_trip_official_diffusers_official_is_bit_exact(official_dir, tmp_path):
    diff, back = tmp_path / "diffusers", tmp_path / "official"
    convert_to_diffusers(official_dir, diff, max_shard_bytes=1_000_000)  # Stage C fp32 (1.8 MB) -> 2 shards
    index = json.loads((diff / "prior" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert (diff / "prior" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    assert (diff / "previewer.safetensors").is_file()  # no diffusers class: copied
    convert_to_official(diff, back)
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in official_dir.iterdir())
    for f in official_dir.iterdir():
        a, b = load_file(f), load_file(back / f.name)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), f.name


def test_diffusers_reads_our_layout_and_we_read_its(tmp_path, official_dir, tiny):
    unet_mod = pytest.importorskip("diffusers.models.unets.unet_stable_cascade")
    diff = tmp_path / "ours"
    convert_to_diffusers(official_dir, diff, max_shard_bytes=1_000_000)
    ref = unet_mod.StableCascadeUNet.from_pretrained(diff / "prior").eval()
    torch.testing.assert_close(ref.state_dict(), to_diffusers(tiny["stage_c_tiny"].state_dict()), rtol=0, atol=0)
    ref = unet_mod.StableCascadeUNet.from_pretrained(diff / "decoder", variant="bf16", torch_dtype=BF16)
    assert ref.dtype == BF16
    # and back: diffusers' own save_pretrained output (2 fp32 shards + a bf16 variant) loads into our classes
    theirs = tmp_path / "theirs" / "prior"
    unet = unet_mod.StableCascadeUNet.from_pretrained(diff / "prior")
    unet.save_pretrained(theirs, max_shard_size="1MB")
    unet.to(BF16).save_pretrained(theirs, variant="bf16")
    index = json.loads((theirs / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert_same_state(load_stage("c", theirs, dtype=FP32), tiny["stage_c_tiny"])  # fp32 asked: the plain shards
    loaded = load_stage("stage_c_tiny", theirs, dtype=BF16)  # bf16 asked: the bf16 variant
    assert_same_state(loaded, copy.deepcopy(tiny["stage_c_tiny"]).to(BF16))


def test_vqgan_folder_uses_its_scale_factor(tmp_path, tiny):
    paella_mod = pytest.importorskip("diffusers.pipelines.wuerstchen.modeling_paella_vq_model")
    kw = full_kwargs(get_preset("stage_a_tiny").cls, get_preset("stage_a_tiny").kwargs)
    ref = paella_mod.PaellaVQModel(levels=2, bottleneck_blocks=kw["bottleneck_blocks"], embed_dim=kw["c_hidden"],
                                   num_vq_embeddings=kw["codebook_size"]).eval()
    ref.load_state_dict(to_diffusers(tiny["stage_a_tiny"].state_dict()), strict=True)
    ref.save_pretrained(tmp_path / "vqgan")  # scale_factor 0.3764, the diffusers default
    model = load_stage("a", tmp_path / "vqgan")
    assert model.scale_factor == pytest.approx(0.3764)
    latent = torch.randn(1, 4, 6, 6)
    with torch.no_grad():  # the diffusers decoder pipeline: vqgan.decode(scale_factor * latents)
        torch.testing.assert_close(model.decode(latent), ref.decode(0.3764 * latent).sample, rtol=1e-5, atol=1e-5)


def test_released_configs_match_the_diffusers_repos():
    # the values of stabilityai/stable-cascade{,-prior} prior/, prior_lite/, decoder/, decoder_lite/
    # (docs/reference.md §8.1)
    table = {
        "stage_c": ([2048, 2048], [32, 32], [8, 24], [24, 8], [1, 1], [1, 1], 2048),
        "stage_c_lite": ([1536, 1536], [24, 24], [4, 12], [12, 4], [1, 1], [1, 1], 1536),
        "stage_b": (
            [320, 640, 1280, 1280],
            [0, 0, 20, 20],
            [2, 6, 28, 6],
            [6, 28, 6, 2],
            [1, 1, 1, 1],
            [3, 3, 2, 2],
            1280,
        ),
        "stage_b_lite": (
            [320, 576, 1152, 1152],
            [0, 9, 18, 18],
            [2, 4, 14, 4],
            [4, 14, 4, 2],
            [1, 1, 1, 1],
            [2, 2, 2, 2],
            1280,
        ),
    }
    keys = ("block_out_channels", "num_attention_heads", "down_num_layers_per_block", "up_num_layers_per_block",
            "down_blocks_repeat_mappers", "up_blocks_repeat_mappers", "conditioning_dim")
    for name, values in table.items():
        p = get_preset(name)
        cfg = kwargs_to_config(p.stage, full_kwargs(p.cls, p.kwargs))
        assert tuple(cfg[k] for k in keys) == values, name
        assert cfg["timestep_conditioning_type"] == (["sca", "crp"] if p.stage == "c" else ["sca"])
        assert cfg["switch_level"] == ([False] if p.stage == "c" else None)
    for p in PRESETS.values():  # config -> kwargs -> config is the identity for every preset with a diffusers class
        if p.stage in ("c", "b", "a"):
            kwargs = full_kwargs(p.cls, p.kwargs)
            assert config_to_kwargs(kwargs_to_config(p.stage, kwargs)) == (p.stage, kwargs), p.name


# ------------------------------------------------------------------------------------------ discovery
def touch(path, config=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config) if config is not None else "")
    return path


def test_find_weights_prefers_the_variant_asked(tmp_path):
    for name in (
        "stage_c.safetensors",
        "stage_c_bf16.safetensors",
        "stage_b_lite_bf16.safetensors",
        "stage_a.safetensors",
    ):
        touch(tmp_path / name)
    assert find_weights(tmp_path, dtype=BF16)["c"].name == "stage_c_bf16.safetensors"
    assert find_weights(tmp_path, dtype=FP32)["c"].name == "stage_c.safetensors"
    assert "b" not in find_weights(tmp_path)  # big asked, only lite present: never substituted
    assert (
        find_weights(tmp_path, lite={"b"}, dtype=FP32)["b"].name == "stage_b_lite_bf16.safetensors"
    )  # dtype fall-back
    assert "c" not in find_weights(tmp_path, lite=True)
    # diffusers layout, in a pipeline sub-folder; a lite model in prior/ (as some re-uploads have it) counts as lite
    sub = tmp_path / "stable-cascade-prior"
    touch(sub / "model_index.json", {})
    touch(sub / "prior" / "config.json", {"block_out_channels": [1536, 1536]})
    touch(sub / "text_encoder" / "config.json", {})
    found = find_weights(tmp_path, lite=True, layout="diffusers")
    assert found["c"] == sub / "prior" and "b" not in found
    assert find_text_encoder(tmp_path) == sub / "text_encoder"


def test_load_pipeline_models(official_dir, tmp_path):
    models = load_pipeline_models(official_dir, dtype={"c": BF16, "b": BF16}, presets={"c": "stage_c_tiny"})
    assert set(models) == {"c", "b", "a", "previewer"}  # effnet is optional and absent
    assert models["c"].dtype == BF16 and models["a"].dtype == FP32
    partial = tmp_path / "partial"
    shutil.copytree(official_dir, partial)
    for f in partial.glob("stage_b*"):
        f.unlink()
    with pytest.raises(
        WeightsError, match=r"Stage B big not found.*stage_b_bf16\.safetensors or stage_b\.safetensors.*decoder/"
    ):
        load_pipeline_models(partial)
    with pytest.raises(WeightsError, match=r"Stage C lite not found.*Found the big variant.*lite=False"):
        load_pipeline_models(official_dir, lite=True)


# ------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_stage("c", tmp_path / "stage_c.safetensors")


def test_wrong_stage(official_dir):
    with pytest.raises(WeightsError, match=r"stage_b\.safetensors is Stage B .* but preset 'stage_c' is Stage C"):
        load_stage("c", official_dir / "stage_b.safetensors")
    with pytest.raises(WeightsError, match=r"is the Previewer.*Stage A"):
        load_stage("a", official_dir / "previewer.safetensors")


@pytest.mark.parametrize("preset, key, shape, says", [
    ("stage_c", "clip_txt_mapper.weight", (1536, 1280), r"Stage C lite 1B .*Stage C big 3.6B.*'stage_c_lite'"),
    ("stage_c_lite", "clip_txt_mapper.weight", (2048, 1280), r"Stage C big 3.6B .*'stage_c'"),
    ("stage_b", "down_blocks.1.0.channelwise.0.weight", (2304, 576), r"Stage B lite 700M .*B big 1.5B.*'stage_b_lite'"),
    ("stage_b_lite", "down_blocks.1.0.channelwise.0.weight", (2560, 640), r"Stage B big 1.5B .*'stage_b'"),
])
def test_lite_vs_big_detected_before_reading_data(tmp_path, monkeypatch, preset, key, shape, says):
    tensors = {key: torch.zeros(shape, dtype=BF16)}  # only what the detector looks at
    if preset.startswith("stage_b"):
        tensors["effnet_mapper.0.weight"] = torch.zeros(1280, 16, 1, 1, dtype=BF16)
    save_file(tensors, tmp_path / "w.safetensors")
    monkeypatch.setattr(ShardedSource, "get", lambda *a: pytest.fail("tensor data read before the checks"))
    with pytest.raises(WeightsError, match=says):
        load_stage(preset, tmp_path / "w.safetensors")


def test_diffusers_file_where_official_expected(tmp_path, tiny):
    save_file(to_diffusers(tiny["stage_c_tiny"].state_dict()), tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=r"diffusers layout.*to_q.*cascade-rt convert --to official"):
        load_stage("stage_c_tiny", tmp_path / "diffusion_pytorch_model.safetensors")


def test_shape_mismatch_lists_the_keys(tmp_path, tiny, save_official):
    sd = dict(tiny["stage_c_tiny"].state_dict())
    sd["clf.1.weight"], sd["embedding.1.bias"] = torch.zeros(8, 48, 1, 1), torch.zeros(47)
    save_official(sd, tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"2 shape mismatches: .*embedding\.1\.bias \(expected \(48,\), found \(47,\)\)"
        r".*clf\.1\.weight \(expected \(16, 48, 1, 1\), found \(8, 48, 1, 1\)\)",
    ):
        load_stage("stage_c_tiny", tmp_path / "w.safetensors")


def test_missing_and_unexpected_keys(tmp_path, tiny, save_official):
    sd = dict(tiny["stage_c_tiny"].state_dict())
    for k in [k for k in sd if k.startswith("up_blocks.1.")][:7]:
        del sd[k]
    sd["extra.weight"] = torch.zeros(1)
    save_official(sd, tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError, match=r"7 missing keys: up_blocks\.1\..*\(7 in all\); 1 unexpected keys: extra\.weight"
    ):
        load_stage("stage_c_tiny", tmp_path / "w.safetensors")


@pytest.mark.parametrize("damage, says", [
    (lambda b: b[:-100], r"truncated: its header describes \d+ bytes but the file has \d+ \(100 missing\).*download"),
    (lambda b: b[:20], r"truncated: its header alone needs"),
    (lambda b: b"", r"0 bytes, too short"),
    (lambda b: (40).to_bytes(8, "little") + b"{this is not json" + b" " * 23 + b[48:], r"corrupt safetensors header"),
    (lambda b: b"\xff" * 8 + b[8:], r"not a valid safetensors file"),
])
def test_damaged_files(official_dir, tmp_path, damage, says):
    data = (official_dir / "stage_c.safetensors").read_bytes()
    (tmp_path / "stage_c.safetensors").write_bytes(damage(data))
    with pytest.raises(WeightsError, match=says):
        load_stage("c", tmp_path / "stage_c.safetensors")


def test_not_a_stable_cascade_model(tmp_path):
    save_file(
        {"projections.0.0.weight": torch.zeros(2, 2), "backbone.0.0.weight": torch.zeros(2)},
        tmp_path / "canny.safetensors",
    )
    with pytest.raises(WeightsError, match="ControlNet checkpoint, but preset 'stage_c'"):
        load_stage("c", tmp_path / "canny.safetensors")


# ------------------------------------------------------------------------------------------ hash, CLI
def test_weights_hash(official_dir, tmp_path, tiny, save_official):
    src = official_dir / "stage_c.safetensors"
    h = weights_hash(src)
    assert h.startswith("sha256:") and weights_hash(shutil.copy(src, tmp_path / "copy.safetensors")) == h
    os.utime(tmp_path / "copy.safetensors", (1, 1))
    assert weights_hash(tmp_path / "copy.safetensors") == h  # mtime is not covered
    other = build_model("stage_c_tiny", seed=99)  # same header, other values (a "fine-tune")
    assert weights_hash(save_official(other, tmp_path / "other.safetensors")) != h
    assert weights_hash(official_dir / "stage_c_bf16.safetensors") != h
    assert weights_hash(tiny["stage_c_tiny"].state_dict()) == weights_hash(dict(tiny["stage_c_tiny"].state_dict()))
    assert weights_hash(tiny["stage_c_tiny"].state_dict()) != weights_hash(other.state_dict())
    assert weights_hash(official_dir) != weights_hash(tmp_path)


def test_cli_convert_round_trip(official_dir, tmp_path, capsys):
    assert (
        cli.main(["convert", "--to", "diffusers", str(official_dir), str(tmp_path / "d"), "--max-shard-size", "1MB"])
        == 0
    )
    assert cli.main(["convert", "--to", "official", str(tmp_path / "d"), str(tmp_path / "o")]) == 0
    for f in official_dir.iterdir():
        a, b = load_file(f), load_file(tmp_path / "o" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert cli.main(["convert", "--to", "official", str(tmp_path / "d"), str(tmp_path / "o")]) == 2  # exists
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "stage_c.safetensors").write_bytes((official_dir / "stage_c.safetensors").read_bytes()[:-8])
    assert cli.main(["convert", "--to", "diffusers", str(tmp_path / "bad"), str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err
    assert "cascade-rt: error:" in err and "truncated" in err and "Traceback" not in err


def test_weights_hash_state_dict_with_tensor_over_2_pow_24_elements():
    # full-size layers exceed 2**24 elements, where an fp32 linspace of sample indices overshoots the last index
    from cascade_rt.checkpoint_io import weights_hash

    big = torch.zeros(2**24 + 5)
    h1 = weights_hash({"w": big})
    big[-1] = 1.0  # the last element is always sampled
    assert weights_hash({"w": big}) != h1
