"""LoRA and ControlNet on a pipeline: what `load_pipeline(lora=..., controlnet=...)` and the CLI's `--lora`,
`--controlnet` set up (docs/extensions.md).

* LoRAs (`cascade_rt.models.lora`) are merged into Stage C's weights in place *before* any backend is built, so
  `compile`, `triton`, CUDA graphs and exported engines all run the LoRA model; the engine cache key and
  manifest name the LoRA files, hashes and scales (`Extensions.describe`), so a changed LoRA never reuses a stale
  engine. ReToken rows go into the text encoder's embedding table. `switch_loras(pipe, ...)` swaps LoRAs in place
  (base weights kept: exact); on engine backends it then writes them into the loaded engine (export/refit.py).
* A ControlNet (`cascade_rt.models.controlnet`) runs eagerly once per prompt; its projections enter Stage C's
  `denoise` as the extra input `cnet`. Engine backends export a separate denoiser variant (`stage_c_cnet`) with
  that input; `Stage C.control_blocks` names the blocks it takes projections for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade_rt.errors import CascadeError, ConfigError
from cascade_rt.models.controlnet import (
    CONTROLS,
    ControlNet,
    MicroResNet,
    build_controlnet,
    control_kind,
    load_controlnet,
    load_saliency_model,
    prepare_control,
)
from cascade_rt.models.lora import (
    LoRAMerger,
    LoRASet,
    LoRAWeights,
    ReTokenMerger,
    TrainTokens,
    load_lora,
    parse_train_tokens,
)

logger = logging.getLogger(__name__)

ENGINE_BACKENDS = ("onnxruntime", "tensorrt", "aoti")  # weights in the artifact: a switch updates the engine


@dataclass(frozen=True)
class LoRAArg:
    path: str
    scale: float = 1.0
    tokens: TrainTokens | None = None  # the training config's train_tokens (None: the file's metadata, if any)


def parse_lora(text: str | tuple | LoRAArg) -> LoRAArg:
    """'FILE' or 'FILE:SCALE' (a trailing ':<number>' is the scale; anything else belongs to the path), a
    LoRAArg, or a tuple (FILE, SCALE[, TOKENS])."""
    if isinstance(text, LoRAArg):
        return text
    if isinstance(text, tuple):
        tokens = parse_train_tokens(list(text[2]), "tokens") if len(text) > 2 and text[2] is not None else None
        return LoRAArg(str(text[0]), float(text[1]) if len(text) > 1 else 1.0, tokens)
    path, sep, tail = str(text).rpartition(":")
    if sep:
        try:
            return LoRAArg(path, float(tail))
        except ValueError:
            pass
    return LoRAArg(str(text), 1.0)


@dataclass
class Extensions:
    """The LoRAs and the ControlNet a pipeline carries (`pipe.extensions`)."""

    loras: LoRASet | None = None
    controlnet: ControlNet | None = None
    control: str | None = None  # 'canny' | 'inpainting' | 'sr'
    controlnet_source: str | None = None
    saliency: MicroResNet | None = None
    switch_seconds: list[float] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What engine manifests record (and the cache keys on): LoRA files/hashes/scales, the ControlNet."""
        out: dict[str, Any] = {}
        if self.loras is not None and self.loras.loras:
            out["lora"] = self.loras.describe()
        if self.controlnet is not None:  # the engine takes its projections: kind and blocks (its weights run eagerly)
            out["controlnet"] = {"kind": self.control, "blocks": list(self.controlnet.proj_blocks)}
        return out


def attach_extensions(
    pipe: Any,
    *,
    lora: Sequence[str | tuple | LoRAArg] = (),
    controlnet: str | None = None,
    controlnet_weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    saliency_model: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> Extensions | None:
    """Load the LoRAs (merged into Stage C) and the ControlNet onto an eager pipeline; None when neither is asked."""
    if not lora and controlnet is None:
        return None
    stage_c = pipe.stage_c
    ext = Extensions()
    if lora:
        loaded: list[LoRAWeights] = []
        for item in map(parse_lora, lora):
            loaded.append(load_lora(item.path, stage_c, scale=item.scale, tokens=item.tokens))
        ext.loras = LoRASet(LoRAMerger(stage_c), ReTokenMerger.for_text_encoder(pipe.text_encoder))
        ext.switch_seconds.append(ext.loras.apply(loaded))
        logger.info("LoRA: %s merged into Stage C in %.3f s", [lw.source for lw in loaded], ext.switch_seconds[-1])
    if controlnet is not None:
        kind = control_kind(controlnet)
        dtype = next(stage_c.parameters()).dtype
        device = next(stage_c.parameters()).device
        path = Path(controlnet_weights) if controlnet_weights else None
        if path is None and weights_dir is not None and (Path(weights_dir) / kind.checkpoint).is_file():
            path = Path(weights_dir) / kind.checkpoint
        if path is not None:
            ext.controlnet = load_controlnet(path, controlnet, stage_c, device=device, dtype=dtype)
            ext.controlnet_source = str(path)
        elif random_weights:
            ext.controlnet = build_controlnet(controlnet, stage_c, seed=seed + 7, device=device, dtype=dtype)
            ext.controlnet_source = f"random:seed={seed + 7}"
        else:
            raise ConfigError(f"--controlnet {controlnet} needs its checkpoint: --controlnet-weights "
                              f"{kind.checkpoint} (or put it in the weights folder)")
        ext.control = controlnet
        if saliency_model is not None:
            ext.saliency = load_saliency_model(saliency_model).to(device)
        stage_c.control_blocks = tuple(ext.controlnet.proj_blocks)  # the exported denoiser variant takes these
    return ext


def control_conditioning(pipe: Any, image: Any, mask: Any, strength: float, latent_hw: Sequence[int],
                         batch: int) -> dict[str, Any] | None:
    """The pipeline's hook: {'cnet': projections} for `denoise`, or None without a control image."""
    ext: Extensions | None = pipe.extensions
    if image is None:
        if mask is not None:
            raise ConfigError("a mask was given without a control image; pass control_image (--control-image)")
        return None
    if ext is None or ext.controlnet is None:
        raise ConfigError("a control image needs a ControlNet: load_pipeline(..., controlnet='canny'|'inpainting'|"
                          "'sr') or --controlnet KIND")
    if mask is not None and ext.control != "inpainting":
        raise ConfigError(f"a mask is only used by the inpainting ControlNet, not {ext.control}")
    return prepare_control(
        ext.controlnet, ext.control, image, latent_hw=latent_hw, batch=batch, strength=float(strength), mask=mask,
        effnet=pipe.effnet, saliency=ext.saliency, device=pipe.device, dtype=pipe.dtypes["c"],
    )


def switch_loras(pipe: Any, lora: Sequence[str | tuple | LoRAArg]) -> float:
    """Replace the pipeline's LoRAs (empty: none) in place; returns the seconds the switch took.

    Where Stage C reads its live weights (eager, compile, triton, CUDA graphs) the merge is the switch. On an
    engine backend the merged weights are then written into the loaded engine (`cascade_rt.export.refit`: ONNX
    Runtime overrides the graph's initializers, TensorRT refits an engine built with `refittable=True`,
    AOTInductor loads new constants); the engine files on disk keep the LoRA they were built with. Where that
    is refused, the previous LoRAs are merged back and the error says what to do.
    """
    runner = getattr(pipe, "runners", {}).get("c")
    backend = getattr(runner, "backend", "eager")
    if backend in ENGINE_BACKENDS and getattr(runner, "engine", None) is None:
        raise ConfigError(f"Stage C runs on {backend} without a loaded engine to update; load the pipeline again "
                          "with the new --lora (the engine cache keys on the LoRA files and scales)")
    ext: Extensions | None = pipe.extensions
    stage_c = pipe.runners["c"].model if hasattr(pipe, "runners") else pipe.stage_c
    if ext is None:
        ext = pipe.extensions = Extensions()
    if ext.loras is None:
        ext.loras = LoRASet(LoRAMerger(stage_c), ReTokenMerger.for_text_encoder(pipe.text_encoder))
    loaded = [load_lora(a.path, stage_c, scale=a.scale, tokens=a.tokens) for a in map(parse_lora, lora)]
    previous = list(ext.loras.loras)
    seconds = ext.loras.apply(loaded)
    if backend in ENGINE_BACKENDS:
        from cascade_rt.export.refit import refit_engine  # engine backends only: the export layer stays unloaded

        try:
            seconds += refit_engine(runner.engine, stage_c)
        except CascadeError:
            ext.loras.apply(previous)  # the eager weights follow the engine, which kept its LoRA
            raise
        if getattr(pipe, "graphed", {}).get("c") is not None:  # a TensorRT refit may move weights: capture again
            pipe.graphed["c"].reset()
    ext.switch_seconds.append(seconds)
    return seconds


__all__ = ["CONTROLS", "Extensions", "LoRAArg", "attach_extensions", "control_conditioning", "parse_lora",
           "switch_loras"]
