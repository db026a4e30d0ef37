"""The eager pipeline on tiny random models (CPU): shapes, seeds, dtypes, errors, runners, recipes, CLI."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from PIL import Image

from cascade_rt.commands.generate import StageBars
from cascade_rt.errors import ConfigError, NumericsError
from cascade_rt.pipeline import StableCascadePipeline, build_random_pipeline
from cascade_rt.sampling import diffuse
from cascade_rt.stages import check_resolution, latent_shapes

FAST = dict(steps_c=3, steps_b=2)  # few steps: the tiny random models exercise every code path anyway


@pytest.fixture(scope="module")
def pipe() -> StableCascadePipeline:
    return build_random_pipeline("tiny", dtype=torch.float32, seed=0)


PARTS = ("text_encoder", "image_encoder", "stage_c", "stage_b", "stage_a", "effnet", "previewer")


def variant(base: StableCascadePipeline, **overrides) -> StableCascadePipeline:
    parts = {name: getattr(base, name) for name in PARTS}
    return StableCascadePipeline(**{**parts, **overrides})


class Spy:
    """A stage runner around an eager model that records what the pipeline asks of it."""

    def __init__(self, model, transform=None):
        self.model, self.transform = model, transform
        self.prepared, self.steps = [], []

    def prepare_conditioning(self, *args, **kwargs):
        self.prepared.append((args, kwargs))
        return self.model.prepare_conditioning(*args, **kwargs)

    def denoise(self, x, r, **cond):
        self.steps.append((x.clone(), r.clone()))
        eps = self.model.denoise(x, r, **cond)
        return self.transform(eps) if self.transform else eps

    def decode(self, latent):
        out = self.model.decode(latent)
        return self.transform(out) if self.transform else out


def test_generate_shapes_seed_and_progress(pipe):
    events = []
    out = pipe(["a cat", "a dog"], height=256, width=384, seed=1, preview=True,
               progress=lambda *e: events.append(e), **FAST)
    assert out.pixels.shape == (2, 3, 256, 384) and out.pixels.dtype == torch.float32
    assert 0.0 <= out.pixels.min().item() and out.pixels.max().item() <= 1.0
    assert out.stage_c_latent.shape == (2, 16, 6, 9) and out.stage_b_latent.shape == (2, 4, 64, 96)
    assert [im.size for im in out.images] == [(384, 256)] * 2 and out.previews[0].size == (9 * 8, 6 * 8)
    assert events == [("c", 1, 3), ("c", 2, 3), ("c", 3, 3), ("b", 1, 2), ("b", 2, 2)]
    assert set(out.timings) == {"text", "stage_c", "previewer", "stage_b", "stage_a"} and out.seed == 1
    again = pipe(["a cat", "a dog"], height=256, width=384, seed=1, **FAST)
    assert torch.equal(again.pixels, out.pixels) and torch.equal(again.stage_c_latent, out.stage_c_latent)
    other = pipe(["a cat", "a dog"], height=256, width=384, seed=2, **FAST)
    assert (other.stage_b_latent - out.stage_b_latent).abs().max().item() > 1e-2


def test_images_per_prompt_and_conditioning_batches(pipe):
    spy_c, spy_b = Spy(pipe.stage_c), Spy(pipe.stage_b)
    out = variant(pipe, stage_c=spy_c, stage_b=spy_b)("a cat", "blurry", height=256, width=256,
                                                      images_per_prompt=2, seed=0, **FAST)
    assert len(out.images) == 2 and not torch.equal(out.stage_c_latent[0], out.stage_c_latent[1])
    (text, pooled, img), _ = spy_c.prepared[0]
    (u_text, u_pooled, u_img), _ = spy_c.prepared[1]
    assert text.shape == (2, 77, 32) and torch.equal(text[0], text[1]) and not torch.equal(text, u_text)
    assert torch.equal(img, torch.zeros(2, 1, 24)) and torch.equal(u_img, img)
    # CFG: one call per step with batch 2B = [x; x]; r is the GDF noise level (0.993583 at t=1, shift 2)
    x, r = spy_c.steps[0]
    assert x.shape == (4, 16, 6, 6) and torch.equal(x[:2], x[2:])
    assert r.tolist() == pytest.approx([0.993583] * 4, abs=1e-5)
    # Stage B: cond = (Stage C x0, pooled text), uncond = (zeros, pooled negative), latent size H/4
    (effnet, b_pooled), kw = spy_b.prepared[0]
    (u_effnet, b_u_pooled), _ = spy_b.prepared[1]
    assert torch.equal(effnet, out.stage_c_latent) and torch.equal(b_pooled, pooled) and kw["latent_hw"] == (64, 64)
    assert torch.equal(u_effnet, torch.zeros_like(effnet)) and torch.equal(b_u_pooled, u_pooled)
    # cfg None: a single pass, no unconditional preparation
    spy_c2 = Spy(pipe.stage_c)
    variant(pipe, stage_c=spy_c2)("a cat", height=256, width=256, cfg_c=None, seed=0, **FAST)
    assert len(spy_c2.prepared) == 1 and spy_c2.steps[0][0].shape[0] == 1


def test_sampler_hook(pipe):
    """The runtime swaps per-stage samplers (CUDA-graphed ones) through `pipe.samplers`."""
    from cascade_rt.sampling import sample_stage

    seen = []

    def recording(model, x_init, cond, uncond, **kw):
        seen.append((x_init.shape, kw["steps"], kw["shift"], kw["cfg"]))
        return sample_stage(model, x_init, cond, uncond, **kw)

    p = variant(pipe)
    p.samplers = {"c": recording, "b": recording}
    out = p("a cat", height=256, width=256, seed=0, **FAST)
    assert seen == [((1, 16, 6, 6), 3, 2.0, 4.0), ((1, 4, 64, 64), 2, 1.0, 1.1)]
    assert torch.equal(out.pixels, pipe("a cat", height=256, width=256, seed=0, **FAST).pixels)


def test_fp32_and_bf16_agree(pipe):
    parts = ("text_encoder", "stage_c", "stage_b", "stage_a")
    bf16 = variant(pipe, **{n: copy.deepcopy(getattr(pipe, n)).to(torch.bfloat16) for n in parts})
    assert bf16.dtypes == {"c": torch.bfloat16, "b": torch.bfloat16, "a": torch.bfloat16}
    ref = pipe("a cat", height=256, width=256, seed=3, **FAST)
    out = bf16("a cat", height=256, width=256, seed=3, **FAST)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(out.stage_c_latent, ref.stage_c_latent) < 0.05
    assert rel(out.stage_b_latent, ref.stage_b_latent) < 0.05
    assert (out.pixels - ref.pixels).abs().mean().item() < 0.01
    assert not torch.equal(out.pixels, ref.pixels)


@pytest.mark.parametrize("size", [(250, 256), (1000, 1024), (128, 256), (2176, 1024), (1024, 768.0)])
def test_bad_resolutions_are_refused(pipe, size):
    with pytest.raises(ConfigError, match="multiple of 128 between 256 and 2048"):
        pipe("x", height=size[0], width=size[1])


def test_latent_shapes_spec():
    assert latent_shapes(2, 1024, 1024) == {"c": (2, 16, 24, 24), "b": (2, 4, 256, 256)}
    assert latent_shapes(1, 1536, 768)["c"] == (1, 16, 36, 18)
    check_resolution(2048, 256)


def test_fp16_stage_c_refused_b_allowed(pipe):
    with pytest.raises(ConfigError, match=r"Stage C cannot run in float16.*overflow.*bfloat16"):
        variant(pipe, stage_c=copy.deepcopy(pipe.stage_c).half())
    with pytest.raises(ConfigError, match="Stage C cannot run in float16"):
        build_random_pipeline("full", dtype=torch.float16)  # refused before building 3.6B parameters
    ok = variant(pipe, stage_b=copy.deepcopy(pipe.stage_b).half(), stage_a=copy.deepcopy(pipe.stage_a).half())
    assert ok.dtypes["b"] == torch.float16


@pytest.mark.parametrize("stage, part", [("Stage C", "stage_c"), ("Stage A", "stage_a")])
def test_nan_is_reported_with_the_stage(pipe, stage, part):
    broken = variant(pipe, **{part: Spy(getattr(pipe, part), transform=lambda t: t * float("nan"))})
    with pytest.raises(NumericsError, match=rf"{stage} produced NaN/Inf.*bfloat16 or float32"):
        broken("x", height=256, width=256, seed=0, **FAST)


def test_user_latents(pipe):
    shapes = latent_shapes(1, 256, 256)
    lc = torch.randn(shapes["c"], generator=torch.Generator().manual_seed(9))
    lb = torch.randn(shapes["b"], generator=torch.Generator().manual_seed(10))
    spy_c, spy_b = Spy(pipe.stage_c), Spy(pipe.stage_b)
    p = variant(pipe, stage_c=spy_c, stage_b=spy_b)
    out = p("a cat", height=256, width=256, seed=0, latents_c=lc, latents_b=lb, **FAST)
    assert torch.equal(spy_c.steps[0][0][:1], lc) and torch.equal(spy_b.steps[0][0][:1], lb)
    assert out.stage_b_latent.shape == lb.shape
    with pytest.raises(ConfigError, match=r"latents_c has shape \(1, 16, 5, 6\), expected \(1, 16, 6, 6\)"):
        pipe("a cat", height=256, width=256, latents_c=torch.zeros(1, 16, 5, 6))


def test_image_to_image(pipe):
    spy_c, effnet_out = Spy(pipe.stage_c), []
    effnet = lambda x: effnet_out.append(pipe.effnet(x)) or effnet_out[-1]  # noqa: E731
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    out = variant(pipe, stage_c=spy_c, effnet=effnet)("a cat", height=256, width=256, image=image, strength=0.5,
                                                      seed=4, steps_c=6, steps_b=2)
    assert len(spy_c.steps) == 3 and out.stage_c_latent.shape == (1, 16, 6, 6)
    # start = the EffNet latent (image resized to 6*32) noised to t=0.5 (shift 1) with the seed's first noise
    assert len(effnet_out) == 1 and effnet_out[0].shape == (1, 16, 6, 6)
    noise = torch.randn(effnet_out[0].shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(spy_c.steps[0][0][:1], diffuse(effnet_out[0], 0.5, noise))
    with pytest.raises(ConfigError, match="no Stage C step"):
        pipe("a cat", height=256, width=256, image=image, strength=0.1, steps_c=5)


def test_image_variation_uses_clip_image_for_cond_only(pipe):
    spy_c = Spy(pipe.stage_c)
    image = Image.new("RGB", (320, 256), (200, 30, 30))
    variant(pipe, stage_c=spy_c)("", height=256, width=256, clip_image=image, images_per_prompt=2, seed=0, **FAST)
    (_, _, img), _ = spy_c.prepared[0]
    (_, _, u_img), _ = spy_c.prepared[1]
    color = torch.tensor([200 / 255, 30 / 255, 30 / 255]).view(1, 3, 1, 1)
    expected = pipe.image_encoder.encode(color.expand(1, 3, 256, 320))
    assert img.shape == (2, 1, 24) and torch.allclose(img[0], expected[0], atol=1e-4) and torch.equal(img[0], img[1])
    assert torch.equal(u_img, torch.zeros(2, 1, 24))


def test_reconstruction(pipe):
    spy_b = Spy(pipe.stage_b)
    image = torch.rand(1, 3, 256, 384, generator=torch.Generator().manual_seed(1))
    out = variant(pipe, stage_b=spy_b).reconstruct(image, steps_b=2, seed=5)
    assert out.pixels.shape == (1, 3, 256, 384) and out.stage_c_latent is None
    assert out.stage_b_latent.shape == (1, 4, 64, 96)
    (effnet, _), kw = spy_b.prepared[0]
    assert effnet.shape == (1, 16, 6, 9) and kw["latent_hw"] == (64, 96)  # 3/4 size (192x288) through EffNet (/32)
    assert len(spy_b.steps) == 2 and spy_b.steps[0][0].shape == (2, 4, 64, 96)  # CFG 1.1 with zero-effnet uncond
    with pytest.raises(ConfigError, match="multiple of 128"):
        pipe.reconstruct(torch.rand(1, 3, 200, 256))


def test_cli_generate_writes_png_with_metadata(tmp_path, capsys):
    from cascade_rt.cli import main

    out = tmp_path / "img.png"
    argv = ["generate", "a red cube", "-o", str(out), "--random-weights", "--preset", "tiny", "--height", "256",
            "--width", "256", "--steps-c", "2", "--steps-b", "2", "--dtype", "fp32", "--seed", "7",
            "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err and "RANDOM WEIGHTS" in captured.out and "stage C" in captured.out
    assert "Stage C" in captured.err  # the progress bar
    with Image.open(out) as im:
        assert im.size == (256, 256)
        meta = json.loads(im.text["cascade-rt"])
        assert "RANDOM WEIGHTS" in im.text["cascade-rt-weights"]
    assert meta["seed"] == 7 and meta["weights"] == "RANDOM" and meta["prompt"] == "a red cube"
    assert main([*argv[:-4], "--dtype", "fp16"]) == 2
    assert "Stage C cannot run in float16" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(out)]) == 2
    assert "--weights DIR" in capsys.readouterr().err


def test_stage_bar_closes_at_its_last_step():
    """A stage's progress bar ends with that stage: its elapsed time must not include the next stage's first step."""
    bars, err = StageBars(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stderr", err)
        for step in (1, 2):
            bars("c", step, 2)
        assert bars.bar is None  # closed at step 2 of 2, before Stage B starts
        bars("b", 1, 1)
        assert bars.bar is None
    assert "Stage C" in err.getvalue() and "Stage B" in err.getvalue()
