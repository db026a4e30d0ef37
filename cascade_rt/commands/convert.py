"""`cascade-rt convert --to {diffusers,official} SRC DST`: move checkpoints between the two layouts, exactly.

official -> diffusers: SRC is a folder of official files (or one file); DST gets prior[_lite]/, decoder[_lite]/,
vqgan/ with config.json + diffusion_pytorch_model[.bf16].safetensors (sharded above --max-shard-size).
diffusers -> official: SRC is a diffusers folder (or one component folder such as prior/); DST gets
stage_c[_lite][_bf16].safetensors, stage_b..., stage_a.safetensors. Tensors are only renamed, split (attention
in_proj -> to_q/to_k/to_v) or concatenated back, so a round trip is bit-exact.
"""

from __future__ import annotations

import argparse
import logging
import re

from cascade_rt.errors import ConfigError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints between the official and the diffusers layout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--to", required=True, choices=("diffusers", "official"), help="layout to write")
    p.add_argument("src", help="official weights folder or file / diffusers folder or component folder")
    p.add_argument("dst", help="output folder (created)")
    p.add_argument(
        "--max-shard-size", default="10GB", help="diffusers shard size limit, e.g. 5GB, 500MB (default 10GB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace files that already exist in DST")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    """'10GB' -> 10_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read the size {text!r}: write it like 10GB, 500MB or 2GiB")
    power = "KMGT".find(m[2].upper()) + 1 if m[2] else 0
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def run(args: argparse.Namespace) -> int:
    from cascade_rt.convert import convert_to_diffusers, convert_to_official

    if args.to == "diffusers":
        written = convert_to_diffusers(
            args.src, args.dst, max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite
        )
    else:
        written = convert_to_official(args.src, args.dst, overwrite=args.overwrite)
    for path in written:
        logger.info("wrote %s", path)
    logger.info("converted %s -> %s (%s layout, %d files)", args.src, args.dst, args.to, len(written))
    return 0
