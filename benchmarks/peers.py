"""Peers run in the same benchmark: what a user would pick instead of cascade-rt, with the very same weights.

* `diffusers`: diffusers' `StableCascadeUNet` (Stage C and B) and `PaellaVQModel` (Stage A), built from our
  preset's config and loaded with our random weights converted by `cascade_rt.diffusers_format.to_diffusers`.
  Driven by our sampling loop (same schedule and noise), so the time difference is the models' own. As diffusers
  does, the UNet recomputes its text conditioning every step, and gets `timestep_ratio` in the model dtype.
* `diffusers-compile`: the same modules under `torch.compile` (default mode, as diffusers documents).
* `max-autotune`: our eager reference under `torch.compile(mode="max-autotune")` (the runtime's compile backend
  with that mode). GPU only: on a CPU Inductor's max-autotune has no GEMM templates to tune, so it is skipped.

Each builder returns a runner with the runtime's stage-runner interface, or raises `BackendUnavailable`.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from cascade_rt.diffusers_format import full_kwargs, kwargs_to_config, to_diffusers
from cascade_rt.errors import BackendUnavailable
from cascade_rt.models import get_preset
from cascade_rt.runtime.backends import build_runner

PEERS = {
    "diffusers": "diffusers 0.35 StableCascadeUNet / PaellaVQModel, eager, same weights (converted)",
    "diffusers-compile": "the diffusers modules under torch.compile (default mode)",
    "max-autotune": "our eager reference under torch.compile(mode='max-autotune') (GPU only)",
}


class DiffusersRunner:
    """Stage runner around a diffusers module: conditioning is only gathered, the model maps it every step."""

    def __init__(self, stage: str, module: nn.Module, step: Callable[..., Any], dtype: torch.dtype) -> None:
        self.stage, self.model, self._step, self.dtype = stage, module, step, dtype
        self.backend = "diffusers"

    def prepare_conditioning(self, *args: Tensor, latent_hw: Any = None) -> dict[str, Tensor]:
        cast = lambda t: t.to(self.dtype)  # noqa: E731
        if self.stage == "c":
            clip_text, clip_text_pooled, clip_img = args
            return {
                "clip_text": cast(clip_text), "clip_text_pooled": cast(clip_text_pooled), "clip_img": cast(clip_img)
            }
        effnet, clip = args[:2]
        return {"effnet": cast(effnet), "clip_text_pooled": cast(clip)}

    def denoise(self, x: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        return self._step(x.to(self.dtype), r.to(self.dtype), **cond)

    def decode(self, latent: Tensor) -> Tensor:
        return self._step(latent.to(self.dtype) * self.model.config.scale_factor)


def _diffusers_classes() -> tuple[type, type]:
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # deprecation banners
            # optional (the dev extra): only the diffusers peers need it
            from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
            from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    except Exception as exc:  # not installed, or a diffusers without Stable Cascade (removed after 0.35)
        raise BackendUnavailable(
            f"diffusers' Stable Cascade models cannot be imported ({type(exc).__name__}: {exc}); "
            "pip install 'diffusers>=0.27,<=0.35.2' (Stable Cascade was deprecated after 0.35.x)"
        ) from None
    return StableCascadeUNet, PaellaVQModel


def build_diffusers(stage: str, preset: str, model: nn.Module, *, compile: bool = False) -> DiffusersRunner:
    """The diffusers twin of our `model` (same weights), on the same device and dtype."""
    unet_cls, vq_cls = _diffusers_classes()
    p = get_preset(preset)
    config = {k: v for k, v in kwargs_to_config(stage, full_kwargs(p.cls, p.kwargs)).items() if not k.startswith("_")}
    param = next(model.parameters())
    cls = vq_cls if stage == "a" else unet_cls
    with torch.device("meta"):
        module = cls(**config)
    state = to_diffusers(model.state_dict(), stage)
    module.load_state_dict(state, strict=True, assign=True)
    module = module.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)

    if stage == "a":
        step: Callable[..., Any] = lambda z: module.decode(z, force_not_quantize=True, return_dict=False)[0]  # noqa: E731
    else:
        step = lambda x, r, **cond: module(x, r, return_dict=False, **cond)[0]  # noqa: E731
    if compile:
        step = torch.compile(step, dynamic=False)
    runner = DiffusersRunner(stage, module, step, param.dtype)
    runner.backend = "diffusers-compile" if compile else "diffusers"
    return runner


def build_max_autotune(stage: str, model: nn.Module, ctx: Any) -> Any:
    """Our eager model's per-step call under torch.compile(mode='max-autotune'), via the runtime's compile backend."""
    if ctx.device.type != "cuda":
        raise BackendUnavailable(
            "torch.compile max-autotune is GPU-only here: on a CPU Inductor has no GEMM templates to autotune, so "
            "it would measure the default mode again (the 'compile' row) at a much longer compile time"
        )


    return build_runner(stage, model, "compile", replace(ctx, compile_mode="max-autotune"))


def build_peer(name: str, stage: str, preset: str, model: nn.Module, ctx: Any) -> Any:
    if name == "diffusers":
        return build_diffusers(stage, preset, model)
    if name == "diffusers-compile":
        if ctx.device.type == "cpu" and not _has_cxx():
            raise BackendUnavailable("torch.compile on the CPU needs a C++ compiler (g++/clang++) on PATH")
        return build_diffusers(stage, preset, model, compile=True)
    if name == "max-autotune":
        return build_max_autotune(stage, model, ctx)
    raise KeyError(name)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))
