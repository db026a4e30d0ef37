"""`cascade-rt reconstruct in.png -o out.png`: Stage A+B as an autoencoder (image -> EffNet -> Stage B -> Stage A)."""

from __future__ import annotations

import argparse

from cascade_rt.commands.generate import (
    RANDOM_NOTE,
    StageBars,
    add_model_args,
    load_from_args,
    save_images,
    timing_line,
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reconstruct", help="encode an image with EffNet and decode it with Stage B + A")
    p.add_argument("image", help="input image; each side a multiple of 128 in [256, 2048]")
    p.add_argument("-o", "--output", default="reconstruction.png")
    p.add_argument("--prompt", default="", help='caption for Stage B\'s pooled text conditioning (default "")')
    p.add_argument("--steps-b", type=int, default=10)
    p.add_argument("--cfg-b", type=float, default=1.1)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    pipe = load_from_args(args)
    bars = StageBars()
    try:
        out = pipe.reconstruct(Image.open(args.image), prompt=args.prompt, steps_b=args.steps_b, cfg_b=args.cfg_b,
                               seed=args.seed, progress=bars)  # fmt: skip
    finally:
        bars.close()
    meta = {
        "source": str(args.image), "prompt": args.prompt, "seed": out.seed, "steps_b": args.steps_b,
        "cfg_b": args.cfg_b, "dtype": args.dtype, "weights": "RANDOM" if args.random_weights else str(args.weights),
    }  # fmt: skip
    paths = save_images(out.images, args.output, meta, args.random_weights)
    print(timing_line(out.timings))
    print(f"wrote {', '.join(map(str, paths))} (seed {out.seed})")
    if args.random_weights:
        print(f"NOTE: {RANDOM_NOTE}")
    return 0
