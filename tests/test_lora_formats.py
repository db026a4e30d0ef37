"""Stage C LoRAs in the diffusers/PEFT and kohya-style layouts, against a reference on diffusers' StableCascadeUNet.

The files are written here from first principles, on the module names of diffusers' StableCascadeUNet (to_q, to_k,
to_v, to_out.0) or of the kohya/ComfyUI split attention (attn.to_q, ..., attn.out_proj). The reference loads the
same base weights into diffusers' StableCascadeUNet (through our key converter) and applies each LoRA as the
trainers define it, `W + scale * alpha / r * B @ A` on each named Linear layer, in float64; our loader converts
the file to the official targets (q, k, v stacked into in_proj_weight) and `LoRAMerger` merges it into the
official Stage C: the outputs must agree.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cascade_rt.diffusers_format import full_kwargs, kwargs_to_config
from cascade_rt.errors import WeightsError
from cascade_rt.models import build_model, get_preset
from cascade_rt.models.lora import LoRAMerger, load_lora, lora_targets, random_lora, save_lora
from cascade_rt.weights import to_diffusers

FP32 = dict(rtol=1e-5, atol=1e-5)
PROJ = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def stage_c() -> nn.Module:
    return build_model("stage_c_tiny", seed=21)


@pytest.fixture(scope="module")
def unet(stage_c) -> nn.Module:
    """diffusers' StableCascadeUNet holding the same weights as `stage_c`."""
    unet_mod = pytest.importorskip("diffusers.models.unets.unet_stable_cascade")
    p = get_preset("stage_c_tiny")
    config = {k: v for k, v in kwargs_to_config("c", full_kwargs(p.cls, p.kwargs)).items() if not k.startswith("_")}
    model = unet_mod.StableCascadeUNet(**config).eval()
    model.load_state_dict(to_diffusers(stage_c.state_dict(), "c"), strict=True)
    return model


def c_inputs(gen, batch=2, hw=(5, 4)):
    return (torch.randn(batch, 16, *hw, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 1, 32, generator=gen),
            torch.randn(batch, 1, 24, generator=gen))


def unet_out(unet, inputs):
    x, r, clip_text, pooled, clip_img = inputs
    return unet(x, r, clip_text_pooled=pooled, clip_text=clip_text, clip_img=clip_img).sample


# ------------------------------------------------------------------------------------------ files and reference
def lora_spec(unet, seed, *, rank=4, std=0.2, skip=(), ranks=None):
    """{diffusers module name: (A (r, in), B (out, r))} for every attention projection not in `skip`."""
    gen = torch.Generator().manual_seed(seed)
    spec = {}
    for name, module in unet.named_modules():
        if name.endswith(PROJ) and ".attention." in name and name not in skip:
            r = (ranks or {}).get(name, rank)
            spec[name] = (torch.randn(r, module.in_features, generator=gen) * std,
                          torch.randn(module.out_features, r, generator=gen) * std)
    return spec


def module_name(name: str, naming: str) -> str:
    """A diffusers module name in another naming: 'split' = the official classes with the attention split into
    Linear layers (sd-scripts, ComfyUI: attention.attn.to_q, attention.attn.out_proj), 'omi' = OneTrainer's
    model-standard names (attention.attn.in_proj.0/1/2, attention.attn.out_proj), 'diffusers' = unchanged."""
    if naming == "diffusers":
        return name
    name = name.replace(".attention.to_out.0", ".attention.attn.out_proj")
    if naming == "omi":
        return re.sub(r"\.attention\.to_([qkv])$", lambda m: f".attention.attn.in_proj.{'qkv'.index(m[1])}", name)
    return name.replace(".attention.to_", ".attention.attn.to_")


def kohya_name(name: str, prefix: str, naming: str) -> str:
    return prefix + module_name(name, naming).replace(".", "_")


def write_kohya(spec, path, *, alphas=None, prefix="lora_unet_", naming="split", dotted=False):
    state = {}
    for name, (a, b) in spec.items():
        key = prefix + module_name(name, naming) if dotted else kohya_name(name, prefix, naming)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
        if alphas and name in alphas:
            state[f"{key}.alpha"] = torch.tensor(float(alphas[name]))
    save_file(state, str(path))
    return path


def write_peft(spec, path, *, prefix="base_model.model.", config=None, metadata=None, adapter=None):
    mid = f".{adapter}" if adapter else ""
    state = {f"{prefix}{n}.lora_{ab}{mid}.weight": t for n, (a, b) in spec.items() for ab, t in (("A", a), ("B", b))}
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    if config is not None:
        (path.parent / "adapter_config.json").write_text(json.dumps(config))
    return path


@torch.no_grad()
def reference(unet, loras):
    """diffusers' UNet with each (spec, scale, alpha_of(name, r)) LoRA applied to its Linear layers, in float64."""
    ref = copy.deepcopy(unet)
    modules = dict(ref.named_modules())
    for name in {n for spec, _, _ in loras for n in spec}:
        w = modules[name].weight.double()
        for spec, scale, alpha_of in loras:
            if name in spec:
                a, b = spec[name]
                w = w + scale * alpha_of(name, a.shape[0]) / a.shape[0] * (b.double() @ a.double())
        modules[name].weight.copy_(w.float())
    return ref


@torch.no_grad()
def merged_out(stage_c, loras, inputs):
    model = copy.deepcopy(stage_c)
    LoRAMerger(model).apply(loras)
    return model(*inputs)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", ["adapter_config", "metadata", "none", "rslora"])
@torch.no_grad()
def test_peft_layout_equals_diffusers_reference(stage_c, unet, tmp_path, gen, case):
    # LoRAs on some projections only: q and v of one block, out of another, nothing on a third
    names = [n for n in lora_spec(unet, 0) if n.startswith("down_blocks.1.2.")]
    skip = {names[1]} | {n for n in lora_spec(unet, 0) if n.startswith("up_blocks.0.5.")}
    spec = lora_spec(unet, 1, rank=4, skip=skip)
    special = "down_blocks.1.5.attention.to_k"
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {special: 2}, "target_modules": list(PROJ)}
    if case == "adapter_config":
        path = write_peft(spec, tmp_path / "adapter_model.safetensors", config=config, adapter="default")
        alpha_of = lambda n, r: 2.0 if n == special else 8.0  # noqa: E731
    elif case == "metadata":  # diffusers' save_lora_weights: component-prefixed keys and config in the header
        meta = {f"prior.{k}": v for k, v in config.items()}
        path = write_peft(spec, tmp_path / "lora.safetensors", prefix="prior.",
                          metadata={"lora_adapter_metadata": json.dumps(meta)})
        alpha_of = lambda n, r: 2.0 if n == special else 8.0  # noqa: E731
    elif case == "rslora":
        path = write_peft(spec, tmp_path / "adapter_model.safetensors", config={"r": 4, "lora_alpha": 6,
                                                                                "use_rslora": True})
        alpha_of = lambda n, r: 6.0 * math.sqrt(r)  # noqa: E731  (scale alpha / sqrt(r) = (6 sqrt(r)) / r)
    else:  # no config anywhere: alpha = r, diffusers' convention
        path = write_peft(spec, tmp_path / "lora.safetensors", prefix="")
        alpha_of = lambda n, r: float(r)  # noqa: E731
    inputs = c_inputs(gen)
    lora = load_lora(path, stage_c, scale=0.8)
    out = merged_out(stage_c, [lora], inputs)
    expected = unet_out(reference(unet, [(spec, 0.8, alpha_of)]), inputs)
    assert (expected - unet_out(unet, inputs)).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(out, expected, **FP32)
    # alpha matters: the same tensors read with alpha = r give another output
    plain = unet_out(reference(unet, [(spec, 0.8, lambda n, r: float(r))]), inputs)
    assert case == "none" or (plain - expected).abs().max() > 1e-3


@pytest.mark.parametrize("prefix, naming, dotted", [
    ("lora_unet_", "split", False),  # kohya sd-scripts' Stable Cascade branch (read by ComfyUI)
    ("lora_prior_unet_", "split", False),  # OneTrainer's saved files
    ("lora_prior_unet_", "diffusers", False),  # OneTrainer's older names: attention_to_q, attention_to_out_0
    ("lora_prior_unet.", "diffusers", True),  # OneTrainer's dotted internal names
    ("unet.", "omi", True),  # OneTrainer's model-standard (OMI) names
])
@torch.no_grad()
def test_kohya_layouts_equal_diffusers_reference(stage_c, unet, tmp_path, gen, prefix, naming, dotted):
    skip = {n for n in lora_spec(unet, 0) if n.startswith("up_blocks.1.2.") and not n.endswith("to_v")}
    ranks = {"down_blocks.0.2.attention.to_out.0": 2, "down_blocks.0.2.attention.to_k": 6}
    spec = lora_spec(unet, 2, rank=4, skip=skip, ranks=ranks)
    alphas = {n: (1.0 + i % 5) for i, n in enumerate(spec) if i % 3}  # the others: no .alpha key, alpha = r
    path = write_kohya(spec, tmp_path / "kohya.safetensors", alphas=alphas, prefix=prefix, naming=naming,
                       dotted=dotted)
    inputs = c_inputs(gen)
    lora = load_lora(path, stage_c, scale=-0.6)
    expected = unet_out(reference(unet, [(spec, -0.6, lambda n, r: alphas.get(n, float(r)))]), inputs)
    torch.testing.assert_close(merged_out(stage_c, [lora], inputs), expected, **FP32)


@torch.no_grad()
def test_alpha_key_scales_the_update(stage_c, unet, tmp_path):
    spec = lora_spec(unet, 3, rank=4)
    with_alpha = load_lora(write_kohya(spec, tmp_path / "a.safetensors", alphas=dict.fromkeys(spec, 1.0)), stage_c)
    without = load_lora(write_kohya(spec, tmp_path / "b.safetensors"), stage_c)  # alpha = r = 4
    for target, a, b in zip(lora_targets(stage_c), with_alpha.layers, without.layers):
        da, db = a.delta(target.shape), b.delta(target.shape)
        torch.testing.assert_close(da * 4, db, rtol=1e-5, atol=1e-7)  # alpha / r: 1/4 vs 1
    # the in_proj update is the q, k, v updates stacked, each B @ A of its own layer
    block = "down_blocks.1.2.attention"
    i = [t.name for t in lora_targets(stage_c)].index(f"{block}.attn")
    expected = torch.cat([spec[f"{block}.to_{n}"][1] @ spec[f"{block}.to_{n}"][0] for n in "qkv"])
    torch.testing.assert_close(without.layers[i].delta((192, 64)), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_official_and_foreign_loras_combine(stage_c, unet, tmp_path, gen):
    official = random_lora(stage_c, rank=4, seed=5, std=0.2)
    spec = lora_spec(unet, 6, rank=3)
    foreign = load_lora(write_peft(spec, tmp_path / "lora.safetensors", config={"lora_alpha": 6}), stage_c)
    inputs = c_inputs(gen)
    out = merged_out(stage_c, [official.with_scale(0.5), foreign.with_scale(-0.7)], inputs)
    # the official LoRA in diffusers' names: its in_proj update split into q, k, v rows (alpha 1, rank 4)
    official_spec = {}
    for target, layer in zip(lora_targets(stage_c), official.layers):
        block = target.name.split(".attention.")[0] + ".attention"
        down, up = layer.lora_down.detach(), layer.lora_up.detach()
        if target.param == "in_proj_weight":
            for n, rows in zip("qkv", up.chunk(3)):
                official_spec[f"{block}.to_{n}"] = (down, rows)
        else:
            official_spec[f"{block}.to_out.0"] = (down, up)
    expected = unet_out(reference(unet, [(official_spec, 0.5, lambda n, r: 1.0),
                                         (spec, -0.7, lambda n, r: 6.0)]), inputs)
    torch.testing.assert_close(out, expected, **FP32)


@torch.no_grad()
def test_converted_lora_is_an_official_lora(stage_c, unet, tmp_path):
    spec = lora_spec(unet, 7, rank=4)
    path = write_peft(spec, tmp_path / "adapter_model.safetensors", config={"lora_alpha": 2})
    lora = load_lora(path, stage_c, scale=0.9)
    assert lora.rank == 12 and {layer.rank for layer in lora.layers} == {12}  # q, k, v stacked: 3 x 4
    described = lora.describe()
    assert described["file"] == str(path.resolve()) and described["scale"] == 0.9
    assert len(described["sha256"]) == 64  # the file's hash combined with adapter_config.json's text
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 3}))
    assert load_lora(path, stage_c).digest != lora.digest  # another alpha is another LoRA
    # saved in the official layout, it loads back as the same LoRA
    again = load_lora(save_lora(lora, tmp_path / "official.safetensors"), stage_c, scale=0.9)
    a, b = copy.deepcopy(stage_c), copy.deepcopy(stage_c)
    LoRAMerger(a).apply([lora])
    LoRAMerger(b).apply([again])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_refused_files(stage_c, unet, tmp_path):
    spec = lora_spec(unet, 8, rank=4)
    a, b, up = torch.zeros(4, 48), torch.zeros(192, 4), torch.zeros(48, 4)

    def kohya(extra, name="f.safetensors"):
        state = {f"{kohya_name(n, 'lora_unet_', 'split')}.lora_{d}.weight": t
                 for n, (x, y) in spec.items() for d, t in (("down", x), ("up", y))}
        save_file({**state, **extra}, str(tmp_path / name))
        return tmp_path / name

    ff = kohya({"lora_unet_down_blocks_0_0_channelwise_0.lora_down.weight": a,
                "lora_unet_down_blocks_0_0_channelwise_0.lora_up.weight": b,
                "lora_unet_down_blocks_0_2_kv_mapper_1.lora_down.weight": torch.zeros(4, 48),
                "lora_unet_down_blocks_0_2_kv_mapper_1.lora_up.weight": torch.zeros(48, 4)})
    with pytest.raises(WeightsError, match=r"2 outside the attention layers \(e\.g\. lora_unet_down_blocks_0_0_"
                                           r"channelwise_0, lora_unet_down_blocks_0_2_kv_mapper_1\).*Only attention"):
        load_lora(ff, stage_c)
    te = kohya({"lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
                "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4)})
    with pytest.raises(WeightsError, match="1 on the text encoder"):
        load_lora(te, stage_c)
    sd = kohya({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": a,
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up})
    with pytest.raises(WeightsError, match="kohya LoRA layout, but .* matches no layer of this StageC"):
        load_lora(sd, stage_c)
    wide = kohya({"lora_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight": torch.zeros(4, 40),
                  "lora_unet_down_blocks_0_2_attention_attn_to_q.lora_up.weight": torch.zeros(48, 4)})
    with pytest.raises(WeightsError, match="maps 40 -> 48 features.*trained for another model"):
        load_lora(wide, stage_c)
    with pytest.raises(WeightsError, match="rank-4 LoRA.*rank 8 was asked"):
        load_lora(kohya({}), stage_c, rank=8)
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight": a}, str(half))
    with pytest.raises(WeightsError, match="only one of its two matrices"):
        load_lora(half, stage_c)
    dora = tmp_path / "dora.safetensors"
    save_file({"down_blocks.0.2.attention.to_q.lora_A.weight": a, "down_blocks.0.2.attention.to_q.lora_B.weight": up,
               "down_blocks.0.2.attention.to_q.lora_magnitude_vector": torch.ones(48)}, str(dora))
    with pytest.raises(WeightsError, match="DoRA"):
        load_lora(dora, stage_c)
    twice = tmp_path / "twice.safetensors"
    save_file({"down_blocks.0.2.attention.to_q.lora_A.weight": a, "down_blocks.0.2.attention.to_q.lora_B.weight": up,
               "lora_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight": a.clone(),
               "lora_unet_down_blocks_0_2_attention_attn_to_q.lora_up.weight": up.clone()}, str(twice))
    with pytest.raises(WeightsError, match="LoRAs of the same layer"):
        load_lora(twice, stage_c)
