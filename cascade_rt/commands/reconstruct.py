"""`cascade-rt reconstruct in.png -o out.png`: Stage A+B as an autoencoder (image -> EffNet -> Stage B -> Stage A)."""

from __future__ import annotations

import argparse

from cascade_rt.commands.generate import (
    RANDOM_NOTE,
    StageBars,
    add_model_args,
    check_model_args,
    load_from_args,
    save_images,
    timing_line,
)
from cascade_rt.stages import SAMPLING


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reconstruct", help="encode an image with EffNet and decode it with Stage B + A")
    p.add_argument("image", help="input image; each side a multiple of 128 in [256, 2048]")
    p.add_argument("-o", "--output", default="reconstruction.png")
    p.add_argument("--prompt", default="", help='caption for Stage B\'s pooled text conditioning (default "")')
    p.add_argument("--steps-b", type=int, default=SAMPLING["b"].steps)
    p.add_argument("--cfg-b", type=float, default=SAMPLING["b"].cfg)
    add_model_args(p)
    p.set_defaults(func=run)


def check_reconstruct_args(args: argparse.Namespace):
    """Every reconstruct option and the input image (decoded, its size checked) before any model is loaded."""
    from cascade_rt.errors import ConfigError
    from cascade_rt.images import open_image
    from cascade_rt.stages import check_resolution
    from cascade_rt.validation import CLI_FLAGS, check_output_path, check_reconstruction

    check_model_args(args)
    check_reconstruction(steps_b=args.steps_b, cfg_b=args.cfg_b, seed=args.seed, names=CLI_FLAGS)
    check_output_path(args.output, "-o")
    image = open_image(args.image, "the input image")
    try:
        check_resolution(image.height, image.width)
    except ConfigError:
        raise ConfigError(
            f"the input image {args.image} is {image.width}x{image.height}: reconstruction needs each side a multiple "
            "of 128 in [256, 2048] (Stage B's latent is size/4, halved three times); crop or resize it"
        ) from None
    return image


def run(args: argparse.Namespace) -> int:
    image = check_reconstruct_args(args)
    pipe = load_from_args(args)
    bars = StageBars()
    try:
        out = pipe.reconstruct(image, prompt=args.prompt, steps_b=args.steps_b, cfg_b=args.cfg_b,
                               seed=args.seed, progress=bars)
    finally:
        bars.close()
    meta = {
        "source": str(args.image), "prompt": args.prompt, "seed": out.seed, "steps_b": args.steps_b,
        "cfg_b": args.cfg_b, "dtype": args.dtype, "weights": "RANDOM" if args.random_weights else str(args.weights),
    }
    paths = save_images(out.images, args.output, meta, args.random_weights)
    print(timing_line(out.timings))
    print(f"wrote {', '.join(map(str, paths))} (seed {out.seed})")
    if args.random_weights:
        print(f"NOTE: {RANDOM_NOTE}")
    return 0
