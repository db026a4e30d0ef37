"""`StableCascadePipeline`: prompts -> images, the eager reference (docs/reference.md §0).

Text (CLIP bigG) -> Stage C (GDF, 20 steps, cfg 4, shift 2) -> Stage B (10 steps, cfg 1.1, shift 1) -> Stage A
decode -> `.float().clamp(0, 1)`. Also image-to-image, image variation and Stage A+B reconstruction.

The pipeline never names a backend. It holds one object per stage with the runner interface
(`stage_c` / `stage_b`: `prepare_conditioning(...)`, `denoise(x, r, **cond)`; `stage_a`: `decode(latent)`):
the eager models themselves, or `cascade_rt.runtime` runners. Conditioning is prepared once per generation
(cond and uncond separately, concatenated by the sampler); each step calls only `denoise`.
Randomness comes from one CPU generator (seed -> bit-reproducible): Stage C start noise, Stage C step noise,
Stage B start noise, Stage B step noise, in that order.
(About 420 lines: the three recipes, text-to-image, image-to-image and reconstruction, share the helpers here.)
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cascade_rt import weights
from cascade_rt.errors import ConfigError, NumericsError
from cascade_rt.extensions import Extensions, control_conditioning
from cascade_rt.images import open_image, to_rgb_array
from cascade_rt.models.effnet import normalize_imagenet
from cascade_rt.models.presets import build_model
from cascade_rt.models.text import ImageEncoder, TextEncoder, build_text_encoder, image_config
from cascade_rt.sampling import diffuse, sample_stage
from cascade_rt.stages import (
    IMG2IMG_STRENGTH,
    RANDOM_SEED_OFFSETS,
    SAMPLING,
    TITLES,
    check_resolution,
    latent_shapes,
    model_set,
)
from cascade_rt.validation import check_generation, check_reconstruction

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # progress(stage, step, total)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def _module(runner: Any) -> nn.Module:
    """The eager module behind a runner (runners keep it as `.model`), or the runner itself."""
    return getattr(runner, "model", runner)


def _dtype(obj: Any) -> torch.dtype:
    dtype = getattr(_module(obj), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(_module(obj).parameters()).dtype


def check_dtypes(dtypes: dict[str, torch.dtype]) -> None:
    for stage, dtype in dtypes.items():
        if dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"{TITLES[stage]} dtype {dtype} is not supported; use bfloat16 or float32")
    if dtypes.get("c") == torch.float16:
        raise ConfigError(
            "Stage C cannot run in float16: its activations overflow the fp16 range (official models/readme.md; "
            "docs/reference.md §6.1). Use bfloat16 (the official setting) or float32"
        )
    for stage in ("b", "a"):
        if dtypes.get(stage) == torch.float16:
            logger.warning("%s in float16 is not an official setting (bf16/fp32 are)", TITLES[stage])


def check_finite(x: Tensor, stage: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NumericsError(
            f"{TITLES[stage]} produced NaN/Inf values (dtype {x.dtype}); run that stage in bfloat16 or "
            "float32 (float16 overflows), and check the weights"
        )


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [0,1] -> PIL RGB images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def from_pil(images: Image.Image | Sequence[Image.Image] | Tensor | str | Path) -> Tensor:
    """PIL image(s), an image file's path, or a (B,3,H,W) / (3,H,W) tensor in [0,1] -> (B,3,H,W) fp32 in [0,1].

    Every PIL mode converts with its own bit depth (`cascade_rt.images.to_rgb_array`): 16-bit images keep their
    range, palette and CMYK images become their RGB colours, and alpha (RGBA, LA, transparent palettes) is
    composited on a white background. A tensor of another shape, or with values outside [0, 1] (0-255 pixels),
    is refused rather than read wrongly."""
    if isinstance(images, Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ConfigError(f"an image tensor must be (B, 3, H, W) or (3, H, W) RGB, got {tuple(images.shape)}")
        x = x.float()
        lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ConfigError(f"image tensor values must be in [0, 1], got [{lo:g}, {hi:g}]"
                              + ("; divide 0-255 pixels by 255" if hi > 1 + 1e-3 and hi <= 255 else ""))
        return x
    if isinstance(images, (str, Path)):
        images = open_image(images, "image")
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise ConfigError("an image must be a PIL image, a list of them, an image file's path, or a (B, 3, H, W) "
                          "tensor in [0, 1]")
    arrays = [torch.from_numpy(np.ascontiguousarray(to_rgb_array(im))).permute(2, 0, 1) for im in images]
    return torch.stack(arrays).float()


@dataclass
class CascadeOutput:
    images: list[Image.Image]
    pixels: Tensor  # (B,3,H,W) fp32 in [0,1]
    stage_c_latent: Tensor | None  # (B,16,h,w) fp32: Stage C x0 (None for reconstruction: the EffNet latent)
    stage_b_latent: Tensor  # (B,4,H/4,W/4) fp32
    seed: int
    previews: list[Image.Image] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class PromptEmbeds:
    """The text phase's output: CLIP embeddings of the prompts and negative prompts, on the pipeline's device."""

    text: Tensor  # (B, 77, c_text)
    pooled: Tensor  # (B, 1, c_pooled)
    u_text: Tensor  # the negative prompts'
    u_pooled: Tensor
    clip_img: Tensor  # (B, 1, c_img): zeros for text-to-image, the CLIP image embedding for a variation
    u_clip_img: Tensor


class WallTimer:
    """Seconds per named section into `timings`, waiting for the current stream at each section's end (what
    `CascadeOutput.timings` reports). Any object with a `section(name)` context manager can stand in for it
    (the benchmarks time the same phases with CUDA events)."""

    def __init__(self, timings: dict[str, float], synchronize: Callable[[], None]) -> None:
        self.timings, self._synchronize = timings, synchronize

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self._synchronize()
        self.timings[name] = time.perf_counter() - t0


class StableCascadePipeline:
    def __init__(
        self,
        *,
        text_encoder: Any,
        stage_c: Any,
        stage_b: Any,
        stage_a: Any,
        effnet: nn.Module | None = None,
        previewer: nn.Module | None = None,
        image_encoder: Any = None,
        mode: str = "official",
    ) -> None:
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.stage_c, self.stage_b, self.stage_a = stage_c, stage_b, stage_a
        self.effnet, self.previewer, self.mode = effnet, previewer, mode
        # per-stage sampler hook (same signature as `sample_stage`): the runtime puts CUDA-graphed samplers here
        self.samplers: dict[str, Callable[..., Tensor]] = {"c": sample_stage, "b": sample_stage}
        self.dtypes = {"c": _dtype(stage_c), "b": _dtype(stage_b), "a": _dtype(stage_a)}
        check_dtypes(self.dtypes)
        self.device = next(_module(stage_c).parameters()).device
        self.extensions: Extensions | None = None  # LoRAs / ControlNet (cascade_rt.extensions), docs/extensions.md

    @classmethod
    def from_pretrained(
        cls,
        weights_dir: str,
        *,
        lite: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        stage_dtypes: dict[str, torch.dtype] | None = None,
        device: str | torch.device = "cpu",
        text_encoder: str | None = None,
    ) -> StableCascadePipeline:
        """Eager pipeline from a weights folder (official or diffusers layout, via `cascade_rt.weights`).

        The text encoder comes from `text_encoder` (a path), else `text_encoder/` or open_clip files in the folder;
        an `image_encoder/` folder, when present, enables image variation. EffNet and previewer load in fp32.
        """

        dtypes = {"c": dtype, "b": dtype, "a": dtype, **(stage_dtypes or {})}
        check_dtypes(dtypes)  # before reading gigabytes
        models = weights.load_pipeline_models(
            weights_dir, lite=lite, device=device, dtype={**dtypes, "effnet": torch.float32, "previewer": torch.float32}
        )
        text_path = text_encoder or weights.find_text_encoder(weights_dir) or weights_dir
        image_dir = Path(weights_dir) / "image_encoder"
        image_encoder = None
        if image_dir.is_dir():
            image_encoder = ImageEncoder.from_pretrained(image_dir, dtype=dtype, device=device)
        return cls(
            text_encoder=TextEncoder.from_pretrained(text_path, dtype=dtype, device=device),
            image_encoder=image_encoder,
            stage_c=models["c"], stage_b=models["b"], stage_a=models["a"],
            effnet=models.get("effnet"), previewer=models.get("previewer"),
        )

    # ------------------------------------------------------------------------------------------ helpers
    def synchronize(self) -> None:
        """Wait for the work queued on this thread's current CUDA stream (no-op on a CPU). Only the current stream:
        the throughput runner times Stage B/A on one stream while Stage C of the next batch runs on another."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        unique = list(dict.fromkeys(prompts))
        text, pooled = self.text_encoder.encode(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=text.device)
        return text[index].to(self.device), pooled[index].to(self.device)

    def initial_latent(self, latent: Tensor | None, shape: tuple[int, ...], gen: torch.Generator,
                       what: str = "latents") -> Tensor:
        """Seeded fp32 noise of `shape` drawn from `gen` (on the CPU, so a seed gives the same image on every
        device), or the caller's `latent`, checked against `shape`."""
        if latent is None:
            return torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device)
        if tuple(latent.shape) != tuple(shape):
            raise ConfigError(f"{what} has shape {tuple(latent.shape)}, expected {tuple(shape)} for this batch/size")
        return latent.to(self.device, torch.float32)

    def _sampler_callback(self, stage: str, total: int, progress: Progress | None):
        if progress is None:
            return None
        return lambda i, x0, x: progress(stage, i + 1, total)

    def _run_stage_b(
        self, effnet_latent: Tensor, pooled: Tensor, uncond_pooled: Tensor, x_init: Tensor, *, steps: int,
        cfg: float | None, shift: float, gen: torch.Generator, progress: Progress | None,
    ) -> Tensor:
        hw = tuple(x_init.shape[-2:])
        cond = self.stage_b.prepare_conditioning(effnet_latent, pooled, latent_hw=hw)
        uncond = None
        if cfg is not None:
            uncond = self.stage_b.prepare_conditioning(torch.zeros_like(effnet_latent), uncond_pooled, latent_hw=hw)
        x0 = self.samplers["b"](
            lambda x, r, **kw: self.stage_b.denoise(x, r, **kw), x_init, cond, uncond, steps=steps, cfg=cfg,
            shift=shift, generator=gen, callback=self._sampler_callback("b", steps, progress), mode=self.mode,
        )
        check_finite(x0, "b")
        return x0

    def _decode(self, latent_b: Tensor) -> Tensor:
        pixels = self.stage_a.decode(latent_b).float()
        check_finite(pixels, "a")
        return pixels.clamp(0, 1)

    # ------------------------------------------------------------------------------------------ public
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        height: int = 1024,
        width: int = 1024,
        images_per_prompt: int = 1,
        steps_c: int = SAMPLING["c"].steps,
        cfg_c: float | None = SAMPLING["c"].cfg,
        shift_c: float = SAMPLING["c"].shift,
        steps_b: int = SAMPLING["b"].steps,
        cfg_b: float | None = SAMPLING["b"].cfg,
        shift_b: float = SAMPLING["b"].shift,
        seed: int | None = None,
        latents_c: Tensor | None = None,
        latents_b: Tensor | None = None,
        image: Any = None,
        strength: float = IMG2IMG_STRENGTH,
        clip_image: Any = None,
        preview: bool = False,
        progress: Progress | None = None,
        control_image: Any = None,
        mask: Any = None,
        control_strength: float = 1.0,
    ) -> CascadeOutput:
        """Text-to-image; with `image`: image-to-image (EffNet latent noised to t=`strength`, int(steps_c*strength)
        Stage C steps); with `clip_image`: image variation (its CLIP embedding conditions Stage C, zeros uncond);
        with `control_image` (and `mask` for inpainting): the loaded ControlNet (docs/extensions.md)."""
        check_generation(height=height, width=width, images_per_prompt=images_per_prompt, steps_c=steps_c,
                         steps_b=steps_b, cfg_c=cfg_c, cfg_b=cfg_b, shift_c=shift_c, shift_b=shift_b, seed=seed,
                         strength=strength, image_given=image is not None)
        image = from_pil(image) if image is not None else None  # read and checked before any work
        clip_image = from_pil(clip_image) if clip_image is not None else None
        control_image = from_pil(control_image) if control_image is not None else None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if not prompts or len(negatives) != len(prompts):
            raise ConfigError("give >= 1 prompt, and one negative prompt per prompt (or one for all)")
        self.check_batch_memory(len(prompts) * images_per_prompt, height, width, prompts=len(prompts))
        prompts = [p for p in prompts for _ in range(images_per_prompt)]
        negatives = [n for n in negatives for _ in range(images_per_prompt)]
        batch = len(prompts)
        seed = random.randrange(2**63) if seed is None else int(seed)
        gen = torch.Generator("cpu").manual_seed(seed)
        shapes = latent_shapes(batch, height, width)
        timings: dict[str, float] = {}
        timer = WallTimer(timings, self.synchronize)

        steps, t_start = steps_c, 1.0
        if image is not None:  # strength and steps checked above
            steps, t_start = int(steps_c * strength), strength

        embeds = self.encode(prompts, negatives, clip_image=clip_image, timer=timer)
        if image is not None:
            with timer.section("effnet"):
                effnet_latent = self._expand(self._effnet_latent(from_pil(image), shapes["c"][-2:]), batch)
            x_c = diffuse(effnet_latent, t_start, torch.randn(effnet_latent.shape, generator=gen).to(self.device))
        else:
            x_c = self.initial_latent(latents_c, shapes["c"], gen, "latents_c")
        control = None
        if control_image is not None or mask is not None:
            with timer.section("controlnet"):
                control = control_conditioning(self, control_image, mask, control_strength, shapes["c"][-2:], batch)
        latent_c = self.prior(embeds, x_c, steps=steps, cfg=cfg_c, shift=shift_c, t_start=t_start, gen=gen,
                              progress=progress, timer=timer, control=control)

        previews = None
        if preview:
            if self.previewer is None:
                raise ConfigError("preview=True needs a previewer model; this pipeline has none")
            with timer.section("previewer"):
                previews = to_pil(self.previewer(latent_c).float().clamp(0, 1))

        x_b = self.initial_latent(latents_b, shapes["b"], gen, "latents_b")
        pixels, latent_b = self.decoder(latent_c, embeds.pooled, embeds.u_pooled, x_b, steps=steps_b, cfg=cfg_b,
                                        shift=shift_b, gen=gen, progress=progress, timer=timer)
        return CascadeOutput(to_pil(pixels), pixels, latent_c, latent_b, seed, previews, timings)

    def check_batch_memory(self, batch: int, height: int, width: int, prompts: int = 1) -> None:
        """Hook called before any work with the number of images generated at once. The eager reference does not
        bound it; `cascade_rt.load_pipeline`'s pipeline refuses a batch that would not fit in memory
        (cascade_rt/runtime/budget.py)."""

    # ------------------------------------------------------------------------------------------ phases
    # Text-to-image is encode -> prior -> decoder. The throughput runner and the benchmarks call these same
    # phases (with their own timer), so what they time is what a user runs.
    def encode(
        self, prompts: list[str], negatives: list[str], *, clip_image: Any = None, timer: Any = None
    ) -> PromptEmbeds:
        """Text phase (section "text"): CLIP text embeddings of the prompts and negatives (repeated prompts encode
        once), and the image-variation embedding of `clip_image` (zeros without one, and always for uncond)."""
        with timer.section("text") if timer is not None else nullcontext():
            text, pooled = self._encode_text(prompts)
            u_text, u_pooled = self._encode_text(negatives)
            for t in (text, pooled, u_text, u_pooled):
                check_finite(t, "text")
            clip_img = torch.zeros(len(prompts), 1, _module(self.stage_c).clip_img_mapper.in_features,
                                   device=self.device)
            u_clip_img = clip_img
            if clip_image is not None:
                if self.image_encoder is None:
                    raise ConfigError("image variation needs an image encoder (CLIP ViT-L/14); this pipeline has none")
                encoded = self.image_encoder.encode(from_pil(clip_image).to(self.device))
                clip_img = self._expand(encoded, len(prompts))
        return PromptEmbeds(text, pooled, u_text, u_pooled, clip_img, u_clip_img)

    def prior(
        self, embeds: PromptEmbeds, x_c: Tensor, *, steps: int, cfg: float | None, shift: float,
        gen: torch.Generator, t_start: float = 1.0, progress: Progress | None = None, timer: Any = None,
        control: dict[str, Any] | None = None,
    ) -> Tensor:
        """Stage C phase (section "stage_c"): conditioning once (uncond only with CFG), then the GDF loop from
        `x_c` at `t_start`. Returns Stage C's latent (fp32), checked finite. `control`: extra step-invariant
        `denoise` inputs (ControlNet projections), the same for both CFG branches (official cnet_uncond = cnet)."""
        with timer.section("stage_c") if timer is not None else nullcontext():
            e, extra = embeds, control or {}
            cond = {**self.stage_c.prepare_conditioning(e.text, e.pooled, e.clip_img), **extra}
            uncond = None
            if cfg is not None:
                uncond = {**self.stage_c.prepare_conditioning(e.u_text, e.u_pooled, e.u_clip_img), **extra}
            latent_c = self.samplers["c"](
                lambda x, r, **kw: self.stage_c.denoise(x, r, **kw), x_c, cond, uncond, steps=steps, cfg=cfg,
                shift=shift, t_start=t_start, generator=gen, callback=self._sampler_callback("c", steps, progress),
                mode=self.mode,
            )
            check_finite(latent_c, "c")
        return latent_c

    def decoder(
        self, effnet: Tensor, pooled: Tensor, u_pooled: Tensor | None, x_b: Tensor, *, steps: int,
        cfg: float | None, shift: float, gen: torch.Generator, progress: Progress | None = None, timer: Any = None,
    ) -> tuple[Tensor, Tensor]:
        """Stage B + A phase (sections "stage_b", "stage_a"): Stage B sampling from `x_b` conditioned on `effnet`
        (Stage C's latent, or EffNet's for reconstruction), then the Stage A decode. Returns (pixels in [0, 1],
        Stage B latent), each checked finite."""
        with timer.section("stage_b") if timer is not None else nullcontext():
            latent_b = self._run_stage_b(effnet, pooled, u_pooled, x_b, steps=steps, cfg=cfg, shift=shift,
                                         gen=gen, progress=progress)
        with timer.section("stage_a") if timer is not None else nullcontext():
            pixels = self._decode(latent_b)
        return pixels, latent_b

    @torch.inference_mode()
    def reconstruct(
        self,
        image: Any,
        *,
        prompt: str = "",
        steps_b: int = SAMPLING["b"].steps,
        cfg_b: float | None = SAMPLING["b"].cfg,
        shift_b: float = SAMPLING["b"].shift,
        seed: int | None = None,
        progress: Progress | None = None,
    ) -> CascadeOutput:
        """Stage A+B as an autoencoder (docs/reference.md §4.5): image -> x3/4 nearest -> EffNet -> Stage B ->
        Stage A."""
        check_reconstruction(steps_b=steps_b, cfg_b=cfg_b, shift_b=shift_b, seed=seed)
        if self.effnet is None:
            raise ConfigError("reconstruction needs the EfficientNet encoder; this pipeline has none")
        pixels_in = from_pil(image)
        height, width = pixels_in.shape[-2:]
        check_resolution(int(height), int(width))
        seed = random.randrange(2**63) if seed is None else int(seed)
        gen = torch.Generator("cpu").manual_seed(seed)
        timings: dict[str, float] = {}
        timer = WallTimer(timings, self.synchronize)
        with timer.section("effnet"):
            small = [int(s * 0.75) // 32 * 32 for s in (height, width)]
            effnet_latent = self._effnet_latent(pixels_in, None, size=small)
            pooled, u_pooled = self._encode_text([prompt] * pixels_in.shape[0])[1], None
            if cfg_b is not None:
                u_pooled = self._encode_text([""] * pixels_in.shape[0])[1]
        shape_b = latent_shapes(pixels_in.shape[0], int(height), int(width))["b"]
        x_b = self.initial_latent(None, shape_b, gen, "latents_b")
        pixels, latent_b = self.decoder(effnet_latent, pooled, u_pooled, x_b, steps=steps_b, cfg=cfg_b,
                                        shift=shift_b, gen=gen, progress=progress, timer=timer)
        return CascadeOutput(to_pil(pixels), pixels, None, latent_b, seed, None, timings)

    def _effnet_latent(
        self, images: Tensor, latent_hw: Sequence[int] | None, size: Sequence[int] | None = None
    ) -> Tensor:
        """EffNet latent of [0,1] images: resized so the latent is `latent_hw` (x32), or to `size` (nearest)."""
        if self.effnet is None:
            raise ConfigError("image-to-image needs the EfficientNet encoder; this pipeline has none")
        images = images.to(self.device)
        if size is not None:
            images = nn.functional.interpolate(images, size=tuple(size), mode="nearest")
        else:
            target = tuple(int(s) * 32 for s in latent_hw)
            images = nn.functional.interpolate(images, size=target, mode="bicubic", antialias=True).clamp(0, 1)
        latent = self.effnet(normalize_imagenet(images)).float()
        check_finite(latent, "effnet")
        return latent

    @staticmethod
    def _expand(x: Tensor, batch: int) -> Tensor:
        if x.shape[0] == batch:
            return x
        if batch % x.shape[0]:
            raise ConfigError(f"got {x.shape[0]} input images for a batch of {batch}; give 1 or {batch}")
        return x.repeat_interleave(batch // x.shape[0], dim=0)


def build_random_pipeline(
    preset: str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    stage_dtypes: dict[str, torch.dtype] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> StableCascadePipeline:
    """A pipeline with random (seeded) weights: "tiny" (CPU tests, demos), "lite" or "full" (shapes/speed only).

    Stage C/B/A and the text/image encoders run in `dtype` (per-stage overrides in `stage_dtypes`, keys c/b/a);
    EfficientNet and the previewer stay fp32, as the official weights are.
    """

    names, off = model_set(preset), RANDOM_SEED_OFFSETS
    dtypes = {"c": dtype, "b": dtype, "a": dtype, **(stage_dtypes or {})}
    check_dtypes(dtypes)  # before building anything large
    return StableCascadePipeline(
        text_encoder=build_text_encoder(names["text"], dtype=dtype, device=device, seed=seed + off["text"]),
        image_encoder=ImageEncoder.random(image_config(preset), dtype=dtype, device=device, seed=seed + off["image"]),
        stage_c=build_model(names["c"], device=device, dtype=dtypes["c"], seed=seed + off["c"]),
        stage_b=build_model(names["b"], device=device, dtype=dtypes["b"], seed=seed + off["b"]),
        stage_a=build_model(names["a"], device=device, dtype=dtypes["a"], seed=seed + off["a"]),
        effnet=build_model(names["effnet"], device=device, seed=seed + off["effnet"]),
        previewer=build_model(names["previewer"], device=device, seed=seed + off["previewer"]),
    )
