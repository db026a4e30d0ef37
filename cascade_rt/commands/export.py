"""`cascade-rt export`: ONNX graphs and engines (ONNX Runtime, TensorRT, AOTInductor) for the pipeline's stages.

    cascade-rt export --stage all --format onnx --preset tiny --random-weights
    cascade-rt export --stage c --format tensorrt --weights ~/stable-cascade --preset lite --height 1024 --width 1024

Each stage is exported (the denoisers with their per-prompt conditioning graph), validated against the eager
model on fresh random inputs and cached under --engine-dir with a manifest; an engine that already fits is reused.
"""

from __future__ import annotations

import argparse
import json
import logging

from cascade_rt.commands.generate import add_lora_args, lora_args
from cascade_rt.errors import ConfigError
from cascade_rt.export.build import FORMATS
from cascade_rt.stages import COMPONENTS

logger = logging.getLogger(__name__)

STAGE_CHOICES = ("text", *COMPONENTS, "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export stages to ONNX and build engines", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGE_CHOICES, default="all")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="DIR", help="official (or diffusers-layout) weights folder")
    src.add_argument("--random-weights", action="store_true", help="random seeded weights (shapes/speed only)")
    p.add_argument("--preset", default="full",
                   help="tiny | lite | full, or an exact preset name (with --weights: lite picks the lite files)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="engine precision; auto = bf16 for TensorRT's text/C/B, fp32 otherwise")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="prompts per batch (CFG doubles it for text/C/B)")
    p.add_argument("--no-cfg", action="store_true", help="build text/C/B for batch B instead of 2B")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and resolution (256..2048, batch 1..4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for tensorrt, else cpu)")
    p.add_argument("--engine-dir", default="engines")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching engine is cached")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 22 for bf16 graphs)")
    p.add_argument("--builder-optimization-level", type=int, default=3, help="TensorRT builder level 0..5")
    p.add_argument("--weight-streaming", action="store_true", help="TensorRT weight streaming (small GPUs)")
    p.add_argument("--refit", action="store_true",
                   help="TensorRT: build Stage C refittable, so a LoRA switch replaces its weights in memory")
    add_lora_args(p, "Stage C LoRA merged before export (repeatable; the engine name and manifest record it)")
    p.add_argument("--controlnet", choices=("canny", "inpainting", "sr"), default=None,
                   help="also export the Stage C denoiser variant with this ControlNet's inputs (stage_c_cnet)")
    p.set_defaults(func=run)


def stages_of(choice: str) -> list[str]:
    from cascade_rt.export.specs import component_graphs

    order = (*COMPONENTS, "text")  # text last: the largest random model
    return [s for key in (order if choice == "all" else (choice,)) for s in component_graphs(key)]


def run(args: argparse.Namespace) -> int:
    from cascade_rt.export.build import EngineRequest, default_precision, resolve_preset, spec_for
    from cascade_rt.export.cache import EngineCache
    from cascade_rt.export.sources import random_source, weights_source
    from cascade_rt.export.specs import Dims

    if not args.weights and not args.random_weights:
        raise ConfigError("say where the weights come from: --weights DIR, or --preset P --random-weights")
    dims = Dims(batch=args.batch, height=args.height, width=args.width, cfg=not args.no_cfg)
    device = args.device or ("cuda" if args.format == "tensorrt" else "cpu")
    cache = EngineCache(args.engine_dir)
    options = {"builder_optimization_level": args.builder_optimization_level, "weight_streaming": args.weight_streaming}
    if args.opset:
        options["opset"] = args.opset
    stages = stages_of(args.stage)
    if args.controlnet and "stage_c" in stages:
        stages.insert(stages.index("stage_c") + 1, "stage_c_cnet")
    rows, sources = [], {}
    for i, stage in enumerate(stages, 1):
        if args.random_weights:
            preset = resolve_preset(args.preset, stage)
            base = stage.replace("_cnet", "")  # the variant has the denoiser's precision policy
            precision = args.dtype if args.dtype != "auto" else default_precision(spec_for(base, preset), args.format)
            key = (preset, precision)
            if key not in sources:  # stage_c and stage_c_cond share one model
                sources[key] = random_source(stage, preset, precision, args.seed)
        else:
            preset_hint = args.preset if args.preset in ("lite", "full") else "full"
            precision = args.dtype if args.dtype != "auto" else ("bf16" if args.format == "tensorrt" else "fp32")
            key = (stage.replace("_cond", "").replace("_cnet", ""), precision)
            if key not in sources:
                sources[key] = weights_source(stage, args.weights, precision, lite=preset_hint == "lite")
        source = sources[key]
        extensions = with_extensions(source, stage, args) if stage.startswith("stage_c") else {}
        request = EngineRequest(
            stage=stage, preset=source.preset, format=args.format, precision=precision,
            weights_hash=source.weights_hash, dims=dims, dynamic=args.dynamic, device=device,
            extensions=json.dumps(extensions, sort_keys=True) if extensions else "",
            refit=args.refit and args.format == "tensorrt" and stage in ("stage_c", "stage_c_cnet"),
        )
        logger.info("[%d/%d] %s (%s, %s)", i, len(stages), request.engine_file, source.preset, args.format)
        cache.ensure(request, source.model, force=args.force, options={**options, "weights_source": source.record})
        rows.append(summary_row(cache, request))
    print(json.dumps(rows, indent=2))
    return 0


def with_extensions(source, stage: str, args: argparse.Namespace) -> dict:
    """Merge --lora into the Stage C source model once (its weights hash follows) and give it --controlnet's
    blocks; returns what this stage's engine name and manifest record (docs/extensions.md)."""
    from cascade_rt.export.sources import model_fingerprint
    from cascade_rt.models.controlnet import build_controlnet
    from cascade_rt.models.lora import LoRAMerger, load_lora

    if getattr(source, "extensions", None) is None:
        ext: dict = {}
        if args.lora:
            loras = [load_lora(a.path, source.model, scale=a.scale, tokens=a.tokens) for a in lora_args(args)]
            LoRAMerger(source.model).apply(loras)
            source.weights_hash = model_fingerprint(source.model)
            ext["lora"] = [lw.describe() for lw in loras]
        if args.controlnet:  # the variant's inputs need only the block list (the ControlNet itself runs eagerly)
            blocks = build_controlnet(args.controlnet, source.model, device="meta").proj_blocks
            source.model.control_blocks = tuple(blocks)
            ext["controlnet"] = {"kind": args.controlnet, "blocks": list(blocks)}
        source.extensions = ext
    ext = source.extensions
    return ext if stage == "stage_c_cnet" else {k: v for k, v in ext.items() if k == "lora"}


def summary_row(cache, request) -> dict:
    from cascade_rt.export.manifest import Manifest

    m = Manifest.read(cache.manifest_path(request))
    worst = max((o["rel_l2"] for o in m.validation.get("outputs", {}).values()), default=None)
    return {
        "engine": m.engine_file, "bytes": sum(f["bytes"] for f in m.files.values()),
        "validation": m.validation.get("status"), "max_rel_l2": worst, "build_seconds": m.build.get("seconds"),
    }
