"""`cascade-rt serve`: an OpenAI-compatible images API with dynamic batching (docs/serving.md).

    cascade-rt serve --random-weights --preset tiny --port 8000          # a 2-core CPU is enough
    cascade-rt serve --weights weights/ --lite --max-batch 4 --max-wait-ms 20
    cascade-rt serve --random-weights --preset tiny --ray --replicas 2   # Ray Serve (local cluster on a CPU)
    cascade-rt serve --weights weights/ --controlnet canny               # per-request control images

The model, backend, memory and CUDA-graph options are those of `cascade-rt generate`.
"""

from __future__ import annotations

import argparse
import logging

from cascade_rt.commands.generate import add_lora_args, add_model_args, load_from_args
from cascade_rt.errors import ConfigError
from cascade_rt.stages import check_resolution, default_size

logger = logging.getLogger(__name__)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'256x256,512x384' (WIDTHxHEIGHT, as OpenAI's `size`) -> ((height, width), ...), each checked."""
    sizes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--sizes item {item!r} is not WIDTHxHEIGHT (e.g. 1024x1024)") from None
        check_resolution(height, width)
        sizes.append((height, width))
    if not sizes:
        raise ConfigError("--sizes is empty; give at least one WIDTHxHEIGHT")
    return tuple(dict.fromkeys(sizes))


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (uvicorn's --host; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="port (uvicorn's --port)")
    g.add_argument("--sizes", default=None, metavar="WxH[,WxH...]",
                   help="image sizes served, warmed (and CUDA-graph-captured) at start; the first is the default "
                        "(default: 1024x1024; 256x256 for --random-weights --preset tiny)")
    g.add_argument("--max-batch", type=int, default=4, help="most images per model batch (default 4)")
    g.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long a request waits for others to share its batch (default 20 ms)")
    g.add_argument("--max-queue", type=int, default=64, help="requests that may wait; past it: 429 (default 64)")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="deadline per request in seconds; past it: 504 (default 300)")
    g.add_argument("--warmup-steps", type=int, default=2, help="steps per stage of the warm-up runs (0: none)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="no Stage C / Stage B+A overlap between batches (it only happens on CUDA, resident memory)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    r = p.add_argument_group("Ray Serve")
    r.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (a local cluster if none)")
    r.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default 1)")
    r.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --replicas and this many replicas (Ray Serve's autoscaling)")
    r.add_argument("--split-stages", action="store_true",
                   help="Stage C and Stage B+A in separate deployments (--replicas replicas each, --gpus-per-replica "
                        "GPUs each), composed behind one ingress")
    r.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs per replica (default 1 on CUDA, else 0)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default 1)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible images API (dynamic batching, metrics; --ray for Ray Serve)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_serve_args(p)
    e = p.add_argument_group("extensions (docs/extensions.md)")
    add_lora_args(e, "an official Stage C LoRA merged for every request, optionally with a scale; repeatable")
    e.add_argument("--controlnet", choices=("canny", "inpainting", "sr"), default=None,
                   help="load this ControlNet: requests send their own control image (docs/serving.md); its "
                        "checkpoint: --controlnet-weights, or the official file in --weights")
    e.add_argument("--controlnet-weights", metavar="FILE", help="canny/inpainting/super_resolution.safetensors")
    e.add_argument("--saliency-model", metavar="FILE",
                   help="official saliency_model.pt: inpainting requests without a mask mask the salient region")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from cascade_rt.serve.app import ServeConfig  # FastAPI and torch: imported when the command runs, not for --help

    if args.max_batch < 1 or args.max_queue < 1 or args.max_wait_ms < 0 or args.request_timeout <= 0:
        raise ConfigError("--max-batch and --max-queue must be >= 1, --max-wait-ms >= 0, --request-timeout > 0")
    if args.sizes is None:
        side = default_size(args.preset if args.random_weights else "full")
        sizes = ((side, side),)
    else:
        sizes = parse_sizes(args.sizes)
    name = f"stable-cascade-random-{args.preset}" if args.random_weights else (
        "stable-cascade-lite" if args.lite else "stable-cascade")
    return ServeConfig(
        sizes=sizes, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, warmup_steps=args.warmup_steps, overlap=args.overlap,
        model_name=name, random_weights=args.random_weights, seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not args.random_weights and not args.weights:
        raise ConfigError("give --weights DIR (a folder with the Stable Cascade checkpoints) or --random-weights")
    # engine backends build profiles for the largest batch at the default size
    args.batch, (args.height, args.width) = config.max_batch, config.sizes[0]
    if args.ray:
        from cascade_rt.serve.ray_app import run_ray  # Ray: only for --ray

        return run_ray(args, config)
    import uvicorn

    from cascade_rt.serve.app import create_app

    app = create_app(lambda: load_from_args(args), config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(config.request_timeout_s))
    return 0
