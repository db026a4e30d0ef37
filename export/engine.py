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

from cascade_rt.errors import ConfigError, EngineError
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


def check_inputs(
    spec: StageSpec, precision: str, inputs: dict[str, torch.Tensor], manifest: Manifest | None = None
) -> dict[str, int]:
    """Validate names, shapes and dtypes against the spec, and shapes against the profile the engine was built
    for (its manifest): a static engine takes its one shape, a dynamic one its [min, max] range. Returns the
    bound symbol values. An engine never runs a shape it was not built for (it would compute garbage)."""
    values = spec.bind(inputs)
    dtypes = spec.dtypes(precision)
    for name, t in inputs.items():
        if t.dtype != dtypes[name]:
            raise ConfigError(f"{spec.stage}: input {name!r} is {t.dtype}, the engine takes {dtypes[name]}")
    if manifest is not None:
        for name, t in inputs.items():
            bounds = manifest.profile.get(name)
            if bounds and not fits(tuple(t.shape), bounds):
                raise EngineShapeError(_shape_message(manifest, name, tuple(t.shape), bounds))
    return values


class EngineShapeError(EngineError):
    """Inputs of a shape the engine was not built for (the message says which shapes it takes)."""


def fits(shape: tuple[int, ...], bounds: list) -> bool:
    lo, hi = tuple(bounds[0]), tuple(bounds[-1])
    return len(shape) == len(lo) == len(hi) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def _shape_message(m: Manifest, name: str, got: tuple[int, ...], bounds: list) -> str:
    lo, hi = tuple(bounds[0]), tuple(bounds[-1])
    d = m.dims
    if not m.dynamic:
        built = f"a static engine for batch {d.get('batch')} at {d.get('height')}x{d.get('width')}"
        takes = f"{name} of shape {lo} only"
    else:
        built, takes = "a dynamic engine", f"{name} of shapes {lo} .. {hi}"
    return (
        f"{m.engine_file} is {built}: it takes {takes}, this call has {got}. Build one for this shape "
        "(load_pipeline(engine_shapes=((batch, height, width), ...)), or `cascade-rt export --batch B --height H "
        "--width W`; several shapes or `--dynamic` give a dynamic engine)"
    )
