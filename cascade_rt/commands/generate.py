"""`cascade-rt generate "prompt" -o out.png`: text-to-image with the eager reference pipeline.

Also holds the model options shared with `cascade-rt reconstruct` (`add_model_args`, `check_model_args`,
`load_from_args`) and the per-stage progress bars / timing line both commands print. Every option, input image
and output path is checked before any model is loaded (`check_generate_args`; docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cascade_rt.stages import IMG2IMG_STRENGTH, RUNTIME_PRESETS, SAMPLING, default_size
from cascade_rt.validation import CLI_FLAGS, check_size

RANDOM_NOTE = "RANDOM WEIGHTS: the models are untrained (seeded random); the image shows noise, not the prompt"
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


class DefaultStr(str):
    """An option's default that knows it is one: `isinstance(args.x, DefaultStr)` means the user did not give it
    (argparse stores the default object itself). It compares and prints as the plain string."""


class DefaultFloat(float):
    """The float counterpart of `DefaultStr`."""


def given(value: Any) -> bool:
    """Whether an option with a `DefaultStr`/`DefaultFloat` default was given on the command line."""
    return not isinstance(value, (DefaultStr, DefaultFloat))


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--weights", metavar="DIR", help="weights folder (official safetensors or diffusers layout)")
    g.add_argument("--lite", action="store_true", help="use the lite Stage C (1B) and Stage B (700M) checkpoints")
    g.add_argument("--random-weights", action="store_true", help="seeded random weights (no download; demos, tests)")
    g.add_argument("--preset", choices=tuple(RUNTIME_PRESETS), default=DefaultStr("tiny"),
                   help="model size for --random-weights (default tiny; edge: lite models, bf16, sequential memory); "
                        "with --weights use --lite")
    g.add_argument("--text-encoder", metavar="PATH", help="CLIP text encoder folder/file if not inside --weights")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="Stage C/B/A dtype (fp16 is refused for C)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed for all noise, an integer in [0, 2**64 - 1] (default: random, printed)")
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
    g.add_argument("--engine-dir", default="engines",
                   help="engine cache for onnxruntime/tensorrt/aoti (default engines/)")


def check_model_args(args: argparse.Namespace) -> None:
    """The model options, before anything is loaded: one source of weights, options that apply to it, a device
    that exists here, a usable weights folder and (for engine backends) a writable engine cache."""
    from cascade_rt.errors import ConfigError, WeightsError
    from cascade_rt.images import path_problem
    from cascade_rt.validation import CLI_FLAGS, check_engine_dir, resolve_device

    if args.weights and args.random_weights:
        raise ConfigError("--weights and --random-weights both given: choose one (--weights DIR for real "
                          "checkpoints, --random-weights for seeded untrained models)")
    if args.weights and given(args.preset):
        raise ConfigError(
            f"--preset {args.preset} applies only to --random-weights: with --weights, pass --lite for the lite "
            "models (and --memory sequential to hold one model on the GPU at a time)"
        )
    if not args.weights and not args.random_weights:
        raise ConfigError("give --weights DIR (a folder with the Stable Cascade checkpoints) or --random-weights")
    if args.random_weights and args.lite:
        raise ConfigError("--lite applies only to --weights: with --random-weights, pass --preset lite")
    if args.weights:
        problem = path_problem(args.weights)
        if problem:
            raise WeightsError(f"--weights {args.weights} {problem}: give the folder that holds the checkpoints")
        if not Path(args.weights).is_dir():
            raise WeightsError(f"--weights {args.weights} is a file: --weights takes the folder that holds the "
                               f"checkpoints (here {Path(args.weights).parent or '.'})")
    if args.random_weights and getattr(args, "text_encoder", None):
        raise ConfigError("--text-encoder applies only to --weights: --random-weights builds its own text encoder")
    if getattr(args, "text_encoder", None):
        problem = path_problem(args.text_encoder)
        if problem:
            raise WeightsError(f"--text-encoder {args.text_encoder} {problem}: give the text encoder's folder or file")
    resolve_device(args.device, CLI_FLAGS)
    if uses_engines(args.backend):
        check_engine_dir(args.engine_dir)


def uses_engines(backend: str) -> bool:
    """Whether a --backend spec names an engine backend (onnxruntime, tensorrt, aoti), which uses --engine-dir."""
    from cascade_rt.runtime.backends import BACKENDS, parse_backend_spec

    return any(getattr(BACKENDS[name], "kind", "") for name in parse_backend_spec(backend).values())


def model_presets(args: argparse.Namespace) -> dict[str, str]:
    """{c, b, a, text} -> model preset names the arguments load (for the memory estimate)."""
    from cascade_rt.stages import model_set

    size = RUNTIME_PRESETS[args.preset].size if args.random_weights else ("lite" if args.lite else "full")
    return {k: v for k, v in model_set(size).items() if k in ("c", "b", "a", "text")}


def memory_mode(args: argparse.Namespace) -> str:
    return args.memory or (RUNTIME_PRESETS[args.preset].memory if args.random_weights else "resident")


class _LoRATokens(argparse.Action):
    """`--lora-tokens` belongs to the `--lora` given just before it (kept as (lora index, spec) pairs)."""

    def __call__(self, parser, namespace, value, option_string=None):  # noqa: ANN001 (argparse's signature)
        loras = getattr(namespace, "lora", None) or []
        if not loras:
            parser.error(f"{option_string} must follow the --lora it belongs to")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (len(loras) - 1, value)])


def add_lora_args(g: Any, help: str) -> None:
    """`--lora FILE[:SCALE]` (repeatable) and `--lora-tokens` for the LoRA before it (generate, serve, export)."""
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help=help)
    g.add_argument("--lora-tokens", action=_LoRATokens, default=[], metavar="CONFIG|TOKEN=INIT_REGEX",
                   help="for the --lora just before: the tokens its ReToken adds, from its training config "
                        "(the YAML's train_tokens) or one '[name]=INIT_REGEX' per use (e.g. '[fernando]=^dog</w>'); "
                        "needed when the file adds tokens and does not name them itself")


def lora_args(args: argparse.Namespace) -> tuple:
    """The --lora options as `cascade_rt.extensions.LoRAArg`s, each with its --lora-tokens."""
    from dataclasses import replace

    from cascade_rt.extensions import parse_lora
    from cascade_rt.models.lora import parse_token_spec, parse_train_tokens

    specs = [parse_lora(x) for x in getattr(args, "lora", ()) or ()]
    tokens: dict[int, list] = {}
    for index, spec in getattr(args, "lora_tokens", ()) or ():
        tokens.setdefault(index, []).extend(parse_token_spec(spec))
    return tuple(replace(s, tokens=parse_train_tokens(tokens[i], f"--lora-tokens of {s.path}")) if i in tokens else s
                 for i, s in enumerate(specs))


def add_extension_args(p: argparse.ArgumentParser) -> None:
    """LoRA and ControlNet (docs/extensions.md)."""
    g = p.add_argument_group("extensions (official Stage C LoRA / ControlNet)")
    add_lora_args(g, "an official Stage C LoRA file, optionally with a scale (default 1); repeat for several")
    g.add_argument("--controlnet", choices=("canny", "inpainting", "sr"), default=None,
                   help="ControlNet kind (its checkpoint: --controlnet-weights, or the official file in --weights)")
    g.add_argument("--controlnet-weights", metavar="FILE", help="canny/inpainting/super_resolution.safetensors")
    g.add_argument("--control-image", metavar="IMG", help="the image the ControlNet filter reads")
    g.add_argument("--mask", metavar="IMG", help="inpainting mask (grayscale, control image size; white = repaint)")
    g.add_argument("--control-strength", type=float, default=1.0,
                   help="multiplier of the ControlNet projections (official cnet_multiplier; default 1.0)")
    g.add_argument("--saliency-model", metavar="FILE",
                   help="official saliency_model.pt: inpainting masks the salient region when no --mask is given")


def load_from_args(args: argparse.Namespace):
    """The pipeline the arguments describe, through `cascade_rt.load_pipeline` (backends, graphs, memory)."""
    import torch

    from cascade_rt import load_pipeline
    from cascade_rt.validation import CLI_FLAGS, resolve_device

    check_model_args(args)
    dtype = getattr(torch, DTYPES[args.dtype])
    device = str(resolve_device(args.device, CLI_FLAGS))
    runtime = dict(
        backend=args.backend, memory=args.memory, cuda_graphs=args.cuda_graphs, device=device, dtype=dtype,
        engine_dir=args.engine_dir,
        engine_shapes=((getattr(args, "batch", 1), getattr(args, "height", 1024), getattr(args, "width", 1024)),),
        lora=lora_args(args), controlnet=getattr(args, "controlnet", None),
        controlnet_weights=getattr(args, "controlnet_weights", None),
        saliency_model=getattr(args, "saliency_model", None),
    )
    if args.random_weights:
        print(f"WARNING: {RANDOM_NOTE}", file=sys.stderr)
        return load_pipeline(random_weights=True, preset=str(args.preset), seed=0, **runtime)
    preset = "lite" if args.lite else "full"
    return load_pipeline(args.weights, preset=preset, text_encoder=args.text_encoder, **runtime)


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
             "stage_b": "stage B", "stage_a": "stage A"}
    parts = [f"{names.get(k, k)} {v:.2f}s" for k, v in timings.items()]
    return "timings: " + " | ".join(parts + [f"total {sum(timings.values()):.2f}s"])


def output_paths(output: str, count: int) -> list[Path]:
    """Where `count` images go: `output` itself for one, out_0.png, out_1.png ... for several."""
    out = Path(output)
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def save_images(images: list, output: str, meta: dict[str, Any], random_weights: bool) -> list[Path]:
    """Write the images (PNG text chunks hold the settings); missing folders are created. A failed write is a
    FileError naming the file and the fix."""
    from PIL.PngImagePlugin import PngInfo

    from cascade_rt.errors import FileError
    from cascade_rt.images import save_image

    out = Path(output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileError(f"cannot create the folder of -o {out}: {exc.strerror or exc}; choose another -o") from None
    paths = output_paths(output, len(images))
    for path, image in zip(paths, images):
        info = PngInfo()
        info.add_text("cascade-rt", json.dumps(meta))
        if random_weights:
            info.add_text("cascade-rt-weights", RANDOM_NOTE)
        save_image(image, path, "-o", pnginfo=info)
    return paths


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="text-to-image (eager by default; --backend per stage, CUDA graphs, memory modes)"
    )
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png", help="PNG path (with --batch N: out_0.png ...)")
    p.add_argument("--negative", default="", help='negative prompt (default "")')
    size_help = "multiple of 128 in [256, 2048] (default 1024; 256 for --preset tiny)"
    p.add_argument("--height", type=int, default=None, help=size_help)
    p.add_argument("--width", type=int, default=None, help=size_help)
    p.add_argument("--batch", type=int, default=1, help="images for the prompt")
    p.add_argument("--steps-c", type=int, default=SAMPLING["c"].steps)
    p.add_argument("--steps-b", type=int, default=SAMPLING["b"].steps)
    p.add_argument("--cfg-c", type=float, default=SAMPLING["c"].cfg)
    p.add_argument("--cfg-b", type=float, default=SAMPLING["b"].cfg)
    p.add_argument("--shift-c", type=float, default=SAMPLING["c"].shift)
    p.add_argument("--image", help="input image for image-to-image")
    p.add_argument("--strength", type=float, default=DefaultFloat(IMG2IMG_STRENGTH),
                   help=f"image-to-image noise level t_start in (0, 1] (default {IMG2IMG_STRENGTH}; needs --image)")
    p.add_argument("--clip-image", help="image for image variation (its CLIP embedding conditions Stage C)")
    p.add_argument("--preview", action="store_true", help="also save the previewer image of Stage C (*_preview.png)")
    add_model_args(p)
    add_extension_args(p)
    p.set_defaults(func=run)


def resolve_resolution(args: argparse.Namespace) -> None:
    """Fill in the default resolution (1024², or 256² for the tiny CPU preset) and refuse a bad one before loading."""
    default = default_size(args.preset if args.random_weights else "full")
    args.height = default if args.height is None else args.height
    args.width = default if args.width is None else args.width
    check_size(args.height, args.width, CLI_FLAGS)


def check_generate_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every generate option before any model is loaded; returns the decoded input images ({"image", "clip_image"})."""
    import torch

    from cascade_rt.errors import ConfigError
    from cascade_rt.images import open_image
    from cascade_rt.runtime.budget import check_batch_memory
    from cascade_rt.validation import CLI_FLAGS, check_generation, check_output_path, resolve_device

    check_model_args(args)
    resolve_resolution(args)
    if given(args.strength) and not args.image:
        raise ConfigError("--strength applies only to image-to-image: add --image FILE, or drop --strength")
    check_generation(height=args.height, width=args.width, images_per_prompt=args.batch, steps_c=args.steps_c,
                     steps_b=args.steps_b, cfg_c=args.cfg_c, cfg_b=args.cfg_b, shift_c=args.shift_c, seed=args.seed,
                     strength=args.strength, image_given=bool(args.image), names=CLI_FLAGS)
    check_output_path(args.output, "-o")  # the name given (a folder?) and the first file written
    check_output_path(output_paths(args.output, args.batch)[0], "-o")
    images = {"image": open_image(args.image, "--image") if args.image else None,
              "clip_image": open_image(args.clip_image, "--clip-image") if args.clip_image else None}
    check_batch_memory(model_presets(args), batch=args.batch, height=args.height, width=args.width,
                       dtype=getattr(torch, DTYPES[args.dtype]), mode=memory_mode(args),
                       device=resolve_device(args.device, CLI_FLAGS), flag="--batch")
    return images


def check_control_args(args: argparse.Namespace) -> dict[str, Any]:
    """The extension options (docs/extensions.md); returns the decoded control image and mask."""
    from cascade_rt.errors import ConfigError
    from cascade_rt.images import open_image

    if args.control_image and not args.controlnet:
        raise ConfigError("--control-image needs --controlnet canny|inpainting|sr")
    if args.mask and args.controlnet != "inpainting":
        raise ConfigError("--mask is only used by --controlnet inpainting (with --control-image)")
    image = open_image(args.control_image, "--control-image").convert("RGB") if args.control_image else None
    return {"control_image": image, "mask": open_image(args.mask, "--mask") if args.mask else None}


def run(args: argparse.Namespace) -> int:
    inputs = check_generate_args(args)
    control = check_control_args(args)
    pipe = load_from_args(args)
    bars = StageBars()
    try:
        out = pipe(
            args.prompt, args.negative, height=args.height, width=args.width, images_per_prompt=args.batch,
            steps_c=args.steps_c, steps_b=args.steps_b, cfg_c=args.cfg_c, cfg_b=args.cfg_b, shift_c=args.shift_c,
            seed=args.seed, image=inputs["image"], clip_image=inputs["clip_image"], strength=float(args.strength),
            preview=args.preview, progress=bars,
            control_image=control["control_image"], mask=control["mask"], control_strength=args.control_strength,
        )
    finally:
        bars.close()
    meta = {
        "prompt": args.prompt, "negative": args.negative, "seed": out.seed, "height": args.height,
        "width": args.width, "steps_c": args.steps_c, "steps_b": args.steps_b, "cfg_c": args.cfg_c,
        "cfg_b": args.cfg_b, "shift_c": args.shift_c, "dtype": args.dtype,
        "weights": "RANDOM" if args.random_weights else str(args.weights), "lite": args.lite,
    }
    if args.random_weights:
        meta["preset"] = args.preset
    if pipe.extensions is not None:
        meta["extensions"] = {**pipe.extensions.describe(), "controlnet_file": pipe.extensions.controlnet_source}
        meta["control_strength"] = args.control_strength if args.controlnet else None
    paths = save_images(out.images, args.output, meta, args.random_weights)
    if out.previews:
        save_images(out.previews, str(Path(args.output).with_name(Path(args.output).stem + "_preview.png")),
                    meta, args.random_weights)
    print(timing_line(out.timings))
    print(f"wrote {', '.join(map(str, paths))} (seed {out.seed})")
    if args.random_weights:
        print(f"NOTE: {RANDOM_NOTE}")
    return 0
