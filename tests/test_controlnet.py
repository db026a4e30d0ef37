"""ControlNet against references written from the official code (modules/controlnet.py `ControlNet`,
`ControlNetDeliverer`, modules/stage_c.py `_down_encode` / `_up_decode` with `cnet`), on random weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from cascade_rt.errors import ConfigError, WeightsError
from cascade_rt.models import build_model
from cascade_rt.models.common import AttnBlock, ResBlock, TimestepBlock
from cascade_rt.models.controlnet import (
    ControlNet,
    build_controlnet,
    canny_filter,
    inpaint_filter,
    load_controlnet,
    mask_from_image,
    prepare_control,
    resblock_widths,
)

FP32 = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ references
class RefCNetResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        ln = lambda: RefLayerNorm2d(c)  # noqa: E731
        self.blocks = nn.Sequential(ln(), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), ln(), nn.GELU(),
                                    nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.blocks(x)


class RefLayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RefControlNet(nn.Module):
    """Official ControlNet with `weights=None` (the state dict is copied in) and a narrow 'large' width."""

    def __init__(self, c_in, c_proj, proj_blocks, bottleneck_mode, large=64):
        super().__init__()
        self.proj_blocks = proj_blocks
        if bottleneck_mode == "effnet":
            embd = 1280
            self.backbone = torchvision.models.efficientnet_v2_s(weights=None).features.eval()
            if c_in != 3:
                self.backbone[0][0] = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)
        elif bottleneck_mode == "simple":
            embd = c_in
            self.backbone = nn.Sequential(nn.Conv2d(embd, embd * 4, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                                          nn.Conv2d(embd * 4, embd, 3, padding=1))
        else:
            embd = 1280
            self.backbone = nn.Sequential(nn.Conv2d(c_in, large, 1), nn.LeakyReLU(0.2, inplace=True),
                                          nn.Conv2d(large, 1024, 1), *[RefCNetResBlock(1024) for _ in range(8)],
                                          nn.Conv2d(1024, 1280, 1))
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(embd, embd, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                          nn.Conv2d(embd, c_proj, 1, bias=False))
            for _ in proj_blocks
        )

    def forward(self, x):
        x = self.backbone(x)
        out = [None for _ in range(max(self.proj_blocks) + 1)]
        for i, idx in enumerate(self.proj_blocks):
            out[idx] = self.projections[i](x)
        return out


class RefDeliverer:
    def __init__(self, projections):
        self.projections, self.idx = projections, 0

    def __call__(self):
        out = self.projections[self.idx] if self.idx < len(self.projections) else None
        self.idx += 1
        return out


def ref_stage_c(model, x, r, clip_text, pooled, clip_img, cnet):
    """Official StageC.forward's level traversal with the deliverer (blocks called in their official form)."""
    F = nn.functional
    r_embed = model.r_embedding(r)
    clip = model.gen_c_embeddings(clip_text, pooled, clip_img)
    x = model.embedding(x)
    cnet = RefDeliverer(cnet) if cnet is not None else None

    def inject(x):
        if cnet is not None:
            nxt = cnet()
            if nxt is not None:
                x = x + F.interpolate(nxt, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return x

    def run(block, x, skip=None):
        if isinstance(block, ResBlock):
            return block(inject(x), skip)
        if isinstance(block, AttnBlock):
            return block(x, clip)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)

    levels = []
    for down_block, downscaler, repmap in zip(model.down_blocks, model.down_downscalers, model.down_repeat_mappers):
        x = downscaler(x)
        for i in range(len(repmap) + 1):
            for block in down_block:
                x = run(block, x)
            if i < len(repmap):
                x = repmap[i](x)
        levels.insert(0, x)
    x = levels[0]
    for i, (up_block, upscaler, repmap) in enumerate(zip(model.up_blocks, model.up_upscalers, model.up_repeat_mappers)):
        for j in range(len(repmap) + 1):
            for k, block in enumerate(up_block):
                skip = levels[i] if isinstance(block, ResBlock) and k == 0 and i > 0 else None
                if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                    x = F.interpolate(x.float(), skip.shape[-2:], mode="bilinear", align_corners=True)
                x = run(block, x, skip)
            if j < len(repmap):
                x = repmap[j](x)
        x = upscaler(x)
    return model.clf(x)


@pytest.fixture(scope="module")
def stage_c():
    return build_model("stage_c_tiny", seed=21)


def c_inputs(gen, batch=2, hw=(8, 8)):
    return (torch.randn(batch, 16, *hw, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 1, 32, generator=gen),
            torch.randn(batch, 1, 24, generator=gen))


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind, c_in, mode, size", [("canny", 1, "effnet", 96), ("inpainting", 4, "effnet", 64),
                                                    ("sr", 16, "large", 6)])
@torch.no_grad()
def test_controlnet_projections_equal_official(stage_c, gen, kind, c_in, mode, size):
    ours = build_controlnet(kind, stage_c, seed=3)
    with torch.device("meta"):  # built empty, filled with our weights
        ref = RefControlNet(c_in, ours.c_proj, list(ours.proj_blocks), mode).eval()
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    x = torch.rand(2, c_in, size, size, generator=gen)
    got, want = ours(x), ref(x)
    assert [g is None for g in got] == [w is None for w in want] and len(got) == max(ours.proj_blocks) + 1
    for g, w in zip(got, want):
        if w is not None:
            assert g.abs().max() > 0
            torch.testing.assert_close(g, w, **FP32)


def test_simple_bottleneck_and_zero_init():
    model = ControlNet(c_in=8, c_proj=48, proj_blocks=[0, 5], bottleneck_mode="simple").eval()
    ref = RefControlNet(8, 48, [0, 5], "simple").eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 8, 4, 4)
    assert all(p is None or p.abs().max() == 0 for p in model(x))  # zero-initialised output projection
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        ref.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x)[5], ref(x)[5], **FP32)


@torch.no_grad()
def test_controlled_stage_c_equals_official(stage_c, gen):
    x, r, clip_text, pooled, clip_img = c_inputs(gen)
    # sanity of the reference: without ControlNet it is the model's forward
    torch.testing.assert_close(ref_stage_c(stage_c, x, r, clip_text, pooled, clip_img, None),
                               stage_c(x, r, clip_text, pooled, clip_img), **FP32)
    n = len(resblock_widths(stage_c))
    widths = resblock_widths(stage_c)
    # projections of other sizes than the blocks' (resized in the model), at every ResBlock, None in between
    cnet = [torch.randn(2, widths[i], 5, 7, generator=gen) if i % 2 == 0 else None for i in range(n)]
    want = ref_stage_c(stage_c, x, r, clip_text, pooled, clip_img, cnet)
    got = stage_c(x, r, clip_text, pooled, clip_img, cnet=cnet)
    assert (want - stage_c(x, r, clip_text, pooled, clip_img)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, **FP32)
    cond = stage_c.prepare_conditioning(clip_text, pooled, clip_img)
    torch.testing.assert_close(stage_c.denoise(x, r, **cond, cnet=cnet), want, **FP32)


@torch.no_grad()
def test_prepare_control_once_per_prompt_equals_official_per_step(stage_c, gen):
    """Projections resized to the latent grid once, times the strength == the official in-loop resize of
    `cnet_multiplier * controlnet(filter(image))` at every step."""
    controlnet = build_controlnet("inpainting", stage_c, seed=4)
    image = torch.rand(1, 3, 200, 150, generator=gen)
    mask = torch.zeros(1, 1, 200, 150, dtype=torch.bool)
    mask[..., 50:120, 30:90] = True
    latent_hw = (8, 6)
    control = prepare_control(controlnet, "inpainting", image, latent_hw=latent_hw, batch=2, strength=0.6, mask=mask)
    assert [c is None for c in control["cnet"]] == [i not in controlnet.proj_blocks for i in range(6)]
    # official: the control input at the control image size (here already 32x the latent grid), list * multiplier
    size = (256, 192)
    pixels = nn.functional.interpolate(image, size=size, mode="bilinear", antialias=True).clamp(0, 1)
    m = nn.functional.interpolate(mask.float(), size=size, mode="nearest").bool()
    official = [None if c is None else c * 0.6 for c in controlnet(inpaint_filter(pixels, m))]
    official = [None if c is None else c.expand(2, -1, -1, -1) for c in official]
    x, r, clip_text, pooled, clip_img = c_inputs(gen, hw=latent_hw)
    want = ref_stage_c(stage_c, x, r, clip_text, pooled, clip_img, official)
    cond = stage_c.prepare_conditioning(clip_text, pooled, clip_img)
    torch.testing.assert_close(stage_c.denoise(x, r, **cond, **control), want, **FP32)
    zero = prepare_control(controlnet, "inpainting", image, latent_hw=latent_hw, batch=2, strength=0.0, mask=mask)
    torch.testing.assert_close(stage_c.denoise(x, r, **cond, **zero), stage_c.denoise(x, r, **cond), **FP32)


def test_inpaint_filter_and_mask_errors():
    images = torch.rand(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    out = inpaint_filter(images, mask)
    assert out.shape == (1, 4, 4, 4)
    assert torch.equal(out[:, :3, :2], torch.ones(1, 3, 2, 4)) and torch.equal(out[:, :3, 2:], images[..., 2:, :])
    assert torch.equal(out[:, 3:], mask.float())
    pil = Image.new("L", (4, 4), 0)
    pil.putpixel((1, 2), 255)
    assert mask_from_image(pil, (4, 4)).sum() == 1 and mask_from_image(pil, (4, 4))[0, 0, 2, 1]
    with pytest.raises(ConfigError, match="RGB image; save it as a grayscale"):
        mask_from_image(Image.new("RGB", (4, 4)), (4, 4))
    with pytest.raises(ConfigError, match="mask is 4x4, the control image 8x6"):
        mask_from_image(pil, (6, 8))
    with pytest.raises(ConfigError, match="needs a mask"):
        prepare_control(build_controlnet("inpainting", build_model("stage_c_tiny", seed=1), seed=0), "inpainting",
                        torch.rand(1, 3, 64, 64), latent_hw=(2, 2), batch=1)


def test_canny_filter_matches_opencv_or_says_what_to_install():
    images = torch.zeros(1, 3, 224, 224)  # the filter's working size: no resampling blurs the 1-pixel edges away
    images[..., 56:168, 56:168] = 1.0
    try:
        import cv2
    except ImportError:
        with pytest.raises(ConfigError, match="pip install opencv-python-headless"):
            canny_filter(images)
        return
    edges = canny_filter(images)
    x = nn.functional.interpolate(images, size=(224, 224), mode="bilinear")
    e = cv2.Canny((x[0].mul(255).permute(1, 2, 0).numpy()).astype("uint8"), 100, 200)
    want = nn.functional.interpolate(torch.tensor(e).div(255)[None, None].float(), size=(224, 224), mode="bilinear")
    torch.testing.assert_close(edges, want)
    assert edges.shape == (1, 1, 224, 224) and edges.max() == 1.0 and edges[..., :32, :32].max() == 0
    assert edges[0, 0, 100, 50:60].max() == 1.0 and edges[0, 0, 100, 60:160].max() == 0  # the square's left edge


def test_controlnet_that_does_not_fit(stage_c, tmp_path, save_official):
    with pytest.raises(ConfigError, match="blocks \\[9\\] do not exist"):
        build_controlnet("canny", stage_c, blocks=(0, 9))
    with pytest.raises(ConfigError, match="blocks 1 \\(width 64\\) have another width"):
        build_controlnet("canny", stage_c, blocks=(0, 1))
    canny = build_controlnet("canny", stage_c, seed=5)
    path = save_official(canny, tmp_path / "canny.safetensors")
    loaded = load_controlnet(path, "canny", stage_c)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[5], canny(x)[5], rtol=0, atol=0)
    with pytest.raises(WeightsError, match="1-channel control inputs.*it is the canny ControlNet"):
        load_controlnet(path, "inpainting", stage_c)
    with pytest.raises(WeightsError, match="2 projections, but canny injects at 3 blocks.*another block list"):
        load_controlnet(path, "canny", stage_c, blocks=(0, 4, 5))
    with pytest.raises(WeightsError, match="not a ControlNet checkpoint"):
        load_controlnet(save_official(stage_c, tmp_path / "c.safetensors"), "canny", stage_c)
    with pytest.raises(ConfigError, match="face identity is not supported: no identity checkpoint is released"):
        build_controlnet("identity", stage_c)


@torch.no_grad()
def test_saliency_mask_from_the_official_model_file(tmp_path, gen):
    """Inpainting without a mask: the official saliency model (MicroResNet, a .pt state dict) and the official
    InpaintFilter steps: resize to 240 (short side), > threshold, [invert], nearest, gaussian_blur(141) > 0.5."""
    import torchvision.transforms.functional as TF

    from cascade_rt.models.controlnet import (
        MicroResNet,
        load_saliency_model,
        saliency_mask,
    )

    torch.manual_seed(0)
    model = MicroResNet().eval()
    for p in model.parameters():  # (under no_grad)
        p.normal_(0, 0.3)
    torch.save(model.state_dict(), tmp_path / "saliency_model.pt")
    loaded = load_saliency_model(tmp_path / "saliency_model.pt")
    images = torch.rand(1, 3, 320, 256, generator=gen)
    small = TF.resize(images, 240, antialias=True)
    threshold = float(model(small).median())  # random weights: a threshold that splits the image
    for outpaint in (False, True):
        sal = model(small) > threshold
        sal = ~sal if outpaint else sal
        want = TF.gaussian_blur(nn.functional.interpolate(sal.float(), size=(320, 256), mode="nearest"), 141) > 0.5
        got = saliency_mask(images, loaded, threshold, outpaint)
        assert got.shape == (1, 1, 320, 256) and torch.equal(got, want) and 0.1 < got.float().mean() < 0.9
    with pytest.raises(WeightsError, match="not the official inpainting saliency model"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
        load_saliency_model(tmp_path / "other.pt")
