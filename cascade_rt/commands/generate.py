"""`cascade-rt generate "prompt" -o out.png`: text-to-image with the eager reference pipeline.

Also holds the model options shared with `cascade-rt reconstruct` (`add_model_args`, `load_from_args`) and the
per-stage progress bars / timing line both commands print.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cascade_rt.stages import IMG2IMG_STRENGTH, RUNTIME_PRESETS, SAMPLING, check_resolution, default_size

RANDOM_NOTE = "RANDOM WEIGHTS: the models are untrained (seeded random); the image shows noise, not the prompt"
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--weights", metavar="DIR", help="weights folder (official safetensors or diffusers layout)")
    g.add_argument("--lite", action="store_true", help="use the lite Stage C (1B) and Stage B (700M) checkpoints")
    g.add_argument("--random-weights", action="store_true", help="seeded random weights (no download; demos, tests)")
    g.add_argument("--preset", choices=tuple(RUNTIME_PRESETS), default="tiny",
                   help="model size for --random-weights (edge: lite models, bf16, sequential memory)")
    g.add_argument("--text-encoder", metavar="PATH", help="CLIP text encoder folder/file if not inside --weights")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="Stage C/B/A dtype (fp16 is refused for C)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", type=int, default=None, help="seed for all noise (default: random, printed)")
    add_runtime_args(p)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Runtime options (cascade_rt.runtime): backend per stage, CUDA graphs, memory mode."""
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", default="eager", metavar="SPEC",
                   help="backend for all stages or per stage, e.g. 'c=tensorrt,b=triton,a=eager' "
                        "(eager, compile, triton, onnxruntime, tensorrt, aoti; `cascade-rt info` lists what runs here)")
    g.add_argument("--memory", choices=("resident", "sequential", "offload"), default=None,
                   help="weights placement (default: resident; sequential for --preset edge)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="sample without CUDA graphs (they are on by default on a CUDA device)")
    g.add_argument("--engine-dir", default="engines", help="engine cache for onnxruntime/tensorrt/aoti (default engines/)")


def load_from_args(args: argparse.Namespace):
    """The pipeline the arguments describe, through `cascade_rt.load_pipeline` (backends, graphs, memory)."""
    import torch

    from cascade_rt import load_pipeline
    from cascade_rt.errors import ConfigError

    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runtime = dict(
        backend=args.backend, memory=args.memory, cuda_graphs=args.cuda_graphs, device=device, dtype=dtype,
        engine_dir=args.engine_dir,
        engine_shapes=((getattr(args, "batch", 1), getattr(args, "height", 1024), getattr(args, "width", 1024)),),
    )  # fmt: skip
    if args.random_weights:
        print(f"WARNING: {RANDOM_NOTE}", file=sys.stderr)
        return load_pipeline(random_weights=True, preset=args.preset, seed=0, **runtime)
    if not args.weights:
        raise ConfigError("give --weights DIR (a folder with the Stable Cascade checkpoints) or --random-weights")
    return load_pipeline(args.weights, preset="lite" if args.lite else "full", text_encoder=args.text_encoder, **runtime)


class StageBars:
    """progress(stage, step, total) -> one tqdm bar per stage on stderr."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.stage: str | None = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.bar, self.stage = tqdm(total=total, desc=f"Stage {stage.upper()}", file=sys.stderr, leave=True), stage
        self.bar.update(step - self.bar.n)
        if step >= total:  # close at the stage's last step: its elapsed time is that stage's alone
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


def timing_line(timings: dict[str, float]) -> str:
    names = {"text": "text", "effnet": "effnet", "stage_c": "stage C", "previewer": "previewer",
             "stage_b": "stage B", "stage_a": "stage A"}  # fmt: skip
    parts = [f"{names.get(k, k)} {v:.2f}s" for k, v in timings.items()]
    return "timings: " + " | ".join(parts + [f"total {sum(timings.values()):.2f}s"])


def save_images(images: list, output: str, meta: dict[str, Any], random_weights: bool) -> list[Path]:
    from PIL.PngImagePlugin import PngInfo

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for path, image in zip(paths, images):
        info = PngInfo()
        info.add_text("cascade-rt", json.dumps(meta))
        if random_weights:
            info.add_text("cascade-rt-weights", RANDOM_NOTE)
        image.save(path, pnginfo=info)
    return paths


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="text-to-image (eager by default; --backend per stage, CUDA graphs, memory modes)")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png", help="PNG path (with --batch N: out_0.png ...)")
    p.add_argument("--negative", default="", help='negative prompt (default "")')
    p.add_argument("--height", type=int, default=None, help="multiple of 128 in [256, 2048] (default 1024; 256 for --preset tiny)")
    p.add_argument("--width", type=int, default=None, help="multiple of 128 in [256, 2048] (default 1024; 256 for --preset tiny)")
    p.add_argument("--batch", type=int, default=1, help="images for the prompt")
    p.add_argument("--steps-c", type=int, default=SAMPLING["c"].steps)
    p.add_argument("--steps-b", type=int, default=SAMPLING["b"].steps)
    p.add_argument("--cfg-c", type=float, default=SAMPLING["c"].cfg)
    p.add_argument("--cfg-b", type=float, default=SAMPLING["b"].cfg)
    p.add_argument("--shift-c", type=float, default=SAMPLING["c"].shift)
    p.add_argument("--image", help="input image for image-to-image")
    p.add_argument("--strength", type=float, default=IMG2IMG_STRENGTH, help="image-to-image noise level t_start")
    p.add_argument("--preview", action="store_true", help="also save the previewer image of Stage C (*_preview.png)")
    add_model_args(p)
    p.set_defaults(func=run)


def resolve_resolution(args: argparse.Namespace) -> None:
    """Fill in the default resolution (1024², or 256² for the tiny CPU preset) and refuse a bad one before loading."""
    default = default_size(args.preset if args.random_weights else "full")
    args.height = default if args.height is None else args.height
    args.width = default if args.width is None else args.width
    check_resolution(args.height, args.width)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    resolve_resolution(args)
    pipe = load_from_args(args)
    bars = StageBars()
    try:
        out = pipe(
            args.prompt, args.negative, height=args.height, width=args.width, images_per_prompt=args.batch,
            steps_c=args.steps_c, steps_b=args.steps_b, cfg_c=args.cfg_c, cfg_b=args.cfg_b, shift_c=args.shift_c,
            seed=args.seed, image=Image.open(args.image) if args.image else None, strength=args.strength,
            preview=args.preview, progress=bars,
        )  # fmt: skip
    finally:
        bars.close()
    meta = {
        "prompt": args.prompt, "negative": args.negative, "seed": out.seed, "height": args.height,
        "width": args.width, "steps_c": args.steps_c, "steps_b": args.steps_b, "cfg_c": args.cfg_c,
        "cfg_b": args.cfg_b, "shift_c": args.shift_c, "dtype": args.dtype,
        "weights": "RANDOM" if args.random_weights else str(args.weights), "lite": args.lite,
    }  # fmt: skip
    if args.random_weights:
        meta["preset"] = args.preset
    paths = save_images(out.images, args.output, meta, args.random_weights)
    if out.previews:
        save_images(out.previews, str(Path(args.output).with_name(Path(args.output).stem + "_preview.png")),
                    meta, args.random_weights)  # fmt: skip
    print(timing_line(out.timings))
    print(f"wrote {', '.join(map(str, paths))} (seed {out.seed})")
    if args.random_weights:
        print(f"NOTE: {RANDOM_NOTE}")
    return 0
