"""The engine protocol the runtime programs against, and the input checks every engine shares.

Lifecycle (after the TensorRT demo, without its per-method branches):

    build    export/build.py turns a model into engine files + manifest (needs the model code)
    open     export/opener.py: a manifest -> the engine object of its format (`open_engine`)
    load     `Engine.load()` deserialises the files (needs no model code: the spec travels in the manifest)
    infer    `engine(**inputs) -> {output_name: tensor}`, names/shapes/dtypes from `engine.spec`

TensorRT splits load further into activate (execution context, device memory) and allocate (bound buffers);
see `trt_engine.TrtEngine`.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from cascade_rt.errors import ConfigError
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.specs import StageSpec


@runtime_checkable
class Engine(Protocol):
    spec: StageSpec
    manifest: Manifest | None

    def load(self) -> None:
        """Deserialise / open the engine files (idempotent)."""

    def __call__(self, feed: Mapping[str, Tensor] | None = None, /, **inputs: Tensor) -> dict[str, Tensor]:
        """Run once: inputs (a mapping or keywords) and outputs named, shaped and typed as `spec` says."""


def named_inputs(feed: Mapping[str, torch.Tensor] | None, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engines accept `engine({"x": x, ...})` and `engine(x=x, ...)`."""
    return {**(feed or {}), **inputs}


def check_inputs(spec: StageSpec, precision: str, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """Validate names, shapes and dtypes against the spec; returns the bound symbol values."""
    values = spec.bind(inputs)
    dtypes = spec.dtypes(precision)
    for name, t in inputs.items():
        if t.dtype != dtypes[name]:
            raise ConfigError(f"{spec.stage}: input {name!r} is {t.dtype}, the engine takes {dtypes[name]}")
    return values
