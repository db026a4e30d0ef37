"""Models against the spec (parameter/key counts, r embedding) and against diffusers (same random weights, converted).

diffusers' StableCascadeUNet / PaellaVQModel are independent implementations of the official classes; the weights
go through `cascade_rt.weights.to_diffusers`, so these tests also pin the key mapping.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cascade_rt.diffusers_format import full_kwargs, kwargs_to_config
from cascade_rt.models import build_model, count_parameters, get_preset
from cascade_rt.models.common import gen_r_embedding
from cascade_rt.weights import to_diffusers

# docs/reference.md §2: exact parameter counts and state-dict key counts of the released checkpoints
SPEC_COUNTS = {
    "stage_c": (3_589_103_632, 1294),
    "stage_c_lite": (1_030_785_040, 654),
    "stage_b": (1_562_941_136, 1454),
    "stage_b_lite": (699_471_248, 826),
    "stage_a": (18_406_894, 122),
    "effnet": (20_197_968, 784),
    "previewer": (3_979_651, 58),
}
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_released_preset_counts_on_meta(name):
    model = build_model(name, device="meta")
    params, keys = SPEC_COUNTS[name]
    assert count_parameters(model) == params == get_preset(name).params
    assert len(model.state_dict()) == keys
    assert all(p.is_meta for p in model.parameters())


def diffusers_unet(preset: str, model: nn.Module) -> nn.Module:
    unet_mod = pytest.importorskip("diffusers.models.unets.unet_stable_cascade")
    p = get_preset(preset)
    config = {k: v for k, v in kwargs_to_config(p.stage, full_kwargs(p.cls, p.kwargs)).items() if not k.startswith("_")}
    ref = unet_mod.StableCascadeUNet(**config).eval()
    ref.load_state_dict(to_diffusers(model.state_dict(), p.stage), strict=True)
    return ref


@pytest.fixture(scope="module")
def stage_c():
    model = build_model("stage_c_tiny", seed=1)
    return model, diffusers_unet("stage_c_tiny", model)


@pytest.fixture(scope="module")
def stage_b():
    model = build_model("stage_b_tiny", seed=2)
    return model, diffusers_unet("stage_b_tiny", model)


def c_inputs(gen, batch=2, hw=(6, 5)):
    return (torch.randn(batch, 16, *hw, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 1, 32, generator=gen),
            torch.randn(batch, 1, 24, generator=gen))


@pytest.mark.parametrize("hw", [(6, 5), (7, 9), (1, 3)])
@torch.no_grad()
def test_stage_c_equals_diffusers(stage_c, gen, hw):
    model, ref = stage_c
    x, r, clip_text, pooled, clip_img = c_inputs(gen, hw=hw)
    out = model(x, r, clip_text, pooled, clip_img)
    expected = ref(x, r, clip_text_pooled=pooled, clip_text=clip_text, clip_img=clip_img).sample
    assert out.shape == (2, 16, *hw)
    torch.testing.assert_close(out, expected, **FP32)
    # non-default t_conds go through mapper_sca / mapper_crp in both (batch 1: diffusers evaluates `sca or zeros`)
    x, r, clip_text, pooled, clip_img = (t[:1] for t in (x, r, clip_text, pooled, clip_img))
    sca, crp = torch.rand(1, generator=gen), torch.rand(1, generator=gen)
    out = model(x, r, clip_text, pooled, clip_img, sca=sca, crp=crp)
    expected = ref(x, r, clip_text_pooled=pooled, clip_text=clip_text, clip_img=clip_img, sca=sca, crp=crp).sample
    torch.testing.assert_close(out, expected, **FP32)


@pytest.mark.parametrize("hw, effnet_hw, pixels", [((32, 32), (6, 6), False), ((40, 24), (5, 7), True)])
@torch.no_grad()
def test_stage_b_equals_diffusers(stage_b, gen, hw, effnet_hw, pixels):
    # 40x24 -> 20x12 -> 10x6 -> 5x3 -> 2x1: the up path resizes to the skip size (official interpolate branch)
    model, ref = stage_b
    x, r = torch.randn(2, 4, *hw, generator=gen), torch.rand(2, generator=gen)
    effnet, pooled = torch.randn(2, 16, *effnet_hw, generator=gen), torch.randn(2, 1, 32, generator=gen)
    px = torch.rand(2, 3, 8, 8, generator=gen) if pixels else None
    out = model(x, r, effnet, pooled, px)
    expected = ref(x, r, clip_text_pooled=pooled, effnet=effnet, pixels=px).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, **FP32)


@torch.no_grad()
def test_stage_a_equals_paella(gen):
    paella_mod = pytest.importorskip("diffusers.pipelines.wuerstchen.modeling_paella_vq_model")
    model = build_model("stage_a_tiny", seed=3)
    kw = full_kwargs(get_preset("stage_a_tiny").cls, get_preset("stage_a_tiny").kwargs)
    ref = paella_mod.PaellaVQModel(
        levels=kw["levels"], bottleneck_blocks=kw["bottleneck_blocks"], embed_dim=kw["c_hidden"],
        latent_channels=kw["c_latent"], num_vq_embeddings=kw["codebook_size"],
    ).eval()
    # strict: the MixingResidualBlock keys equal ours, only the codebook is renamed
    ref.load_state_dict(to_diffusers(model.state_dict(), "a"), strict=True)
    latent = torch.randn(2, 4, 8, 6, generator=gen)
    # diffusers applies the scale factor outside decode (pipeline: vqgan.decode(scale * latents)); ours inside (x0.43)
    expected = ref.decode(latent * 0.43, force_not_quantize=True).sample
    torch.testing.assert_close(model.decode(latent), expected, **FP32)
    images = torch.rand(1, 3, 32, 24, generator=gen)
    # return_dict=False: diffusers 0.35's VQEncoderOutput raises its own stale deprecation error
    torch.testing.assert_close(model.encode(images)[0], ref.encode(images, return_dict=False)[0] / 0.43, **FP32)


@torch.no_grad()
def test_attn_block_equals_torch_multihead_attention(gen):
    block = build_model("stage_c_tiny", seed=4).attn_blocks()[0]
    x, cond = torch.randn(2, 48, 5, 3, generator=gen), torch.randn(2, 9, 48, generator=gen)
    tokens = block.norm(x).flatten(2).transpose(1, 2)
    kv = torch.cat([tokens, block.kv_mapper(cond)], dim=1)
    mha_out = block.attention.attn(tokens, kv, kv, need_weights=False)[0]  # torch's own MHA math on the same params
    expected = x + mha_out.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x, cond), expected, **FP32)
    torch.testing.assert_close(block.attend(x, *block.cond_kv(cond)), expected, **FP32)


@torch.no_grad()
def test_conditioning_split_is_step_invariant(stage_c, stage_b, gen):
    """prepare_conditioning once, denoise at several r == the unsplit diffusers forward at each r."""
    model, ref = stage_c
    x, _, clip_text, pooled, clip_img = c_inputs(gen)
    cond = model.prepare_conditioning(clip_text, pooled, clip_img)
    assert len(cond["cond_kv"]) == len(model.attn_blocks())
    for r in (torch.full((2,), 0.99), torch.tensor([0.3, 0.7])):
        expected = ref(x, r, clip_text_pooled=pooled, clip_text=clip_text, clip_img=clip_img).sample
        torch.testing.assert_close(model.denoise(x, r, **cond), expected, **FP32)
    model, ref = stage_b
    x, effnet, pooled = (
        torch.randn(1, 4, 32, 32, generator=gen),
        torch.randn(1, 16, 6, 6, generator=gen),
        torch.randn(1, 1, 32, generator=gen),
    )
    cond = model.prepare_conditioning(effnet, pooled, latent_hw=x.shape[-2:])
    for r in (torch.tensor([0.9]), torch.tensor([0.1])):
        expected = ref(x, r, clip_text_pooled=pooled, effnet=effnet).sample
        torch.testing.assert_close(model.denoise(x, r, **cond), expected, **FP32)


@pytest.mark.parametrize("name", ["stage_c_tiny", "stage_b_tiny", "stage_a_tiny", "previewer_tiny"])
@torch.no_grad()
def test_bf16_forward_close_to_fp32(name, gen):
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op). With fp32 norm statistics and an fp32
    # r embedding the error grows slowly with depth: these models measure 4e-3..7e-3 relative L2. 2e-2 leaves ~3x
    # headroom yet fails on a real dtype bug (e.g. the r embedding in bf16 ruins the phase of sin(r * 1e4 * f)).
    inputs = {
        "stage_c_tiny": lambda: c_inputs(gen),
        "stage_b_tiny": lambda: (torch.randn(2, 4, 32, 32, generator=gen), torch.rand(2, generator=gen),
                                 torch.randn(2, 16, 6, 6, generator=gen), torch.randn(2, 1, 32, generator=gen)),
        "stage_a_tiny": lambda: (torch.randn(2, 4, 8, 8, generator=gen),),
        "previewer_tiny": lambda: (torch.randn(2, 16, 6, 6, generator=gen),),
    }[name]()
    run = (lambda m: m.decode(*inputs)) if name == "stage_a_tiny" else (lambda m: m(*inputs))
    fp32 = run(build_model(name, seed=5))
    bf16 = run(build_model(name, seed=5, dtype=torch.bfloat16))
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert ((bf16.float() - fp32).norm() / fp32.norm()).item() < 2e-2


def test_r_embedding_matches_spec():
    emb0 = gen_r_embedding(torch.zeros(3), 64)
    assert torch.equal(emb0, torch.cat([torch.zeros(3, 32), torch.ones(3, 32)], dim=1))  # emb(0) is not zero
    r = torch.tensor([0.25, 0.993583], dtype=torch.bfloat16)
    emb = gen_r_embedding(r, 64)
    assert emb.dtype == torch.float32
    # f_i = exp(-ln(1e4) * i / 31): the divisor is half_dim - 1 = 31, so f_31 = 1e-4 and sin(r * 1e4 * f_31) = sin(r)
    r32 = r.float()
    torch.testing.assert_close(emb[:, 31], torch.sin(r32), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb[:, 63], torch.cos(r32), rtol=1e-6, atol=1e-6)
    f1 = math.exp(-math.log(1e4) / 31)
    torch.testing.assert_close(emb[:, 1], torch.sin(r32 * 1e4 * f1), rtol=1e-5, atol=1e-5)
    model = build_model("stage_c_tiny", device="meta")
    assert model.r_embedding(torch.zeros(2, device="meta")).shape == (2, 192)  # r + sca + crp


@torch.no_grad()
def test_stage_c_accepts_2d_pooled(stage_c, gen):
    model, _ = stage_c
    x, r, clip_text, pooled, clip_img = c_inputs(gen)
    torch.testing.assert_close(
        model(x, r, clip_text, pooled[:, 0], clip_img[:, 0]), model(x, r, clip_text, pooled, clip_img)
    )


@torch.no_grad()
def test_effnet_and_previewer_shapes(gen):
    effnet = build_model("effnet", seed=6)
    assert isinstance(effnet.backbone, nn.Sequential)
    assert effnet(torch.rand(1, 3, 32, 64, generator=gen)).shape == (1, 16, 1, 2)  # (B, 16, H/32, W/32)
    previewer = build_model("previewer_tiny", seed=6)
    assert previewer(torch.randn(2, 16, 3, 5, generator=gen)).shape == (2, 3, 24, 40)  # x8
