"""`cascade-rt info`: versions, devices and which backends can run here."""

from __future__ import annotations

import argparse
import json
import platform


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print versions and devices")
    p.set_defaults(func=run)


def environment() -> dict:
    import torch

    env: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    if torch.cuda.is_available():
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for mod in ("triton", "onnx", "onnxruntime", "tensorrt", "diffusers", "transformers", "open_clip"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed (or broken): report it as absent
            env[mod] = None
    return env


def backends() -> dict:
    """Every runtime backend on this machine's default device: "ok", or why it cannot run."""
    from cascade_rt.runtime.backends import available_backends

    return {name: "ok" if s.available else s.reason for name, s in available_backends().items()}


def run(args: argparse.Namespace) -> int:
    print(json.dumps({**environment(), "backends": backends()}, indent=2))
    return 0
