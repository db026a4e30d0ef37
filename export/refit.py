"""Refit plans: where an exported graph holds each LoRA-targeted Stage C weight, so a LoRA switch can overwrite
those weights in an engine without exporting or building it again (docs/extensions.md).

What the exporter makes of the targets (measured, torch 2.14 `torch.onnx.export(dynamo=True)`, optimised, on
the tiny Stage C): `F.linear(tokens, in_proj_weight, in_proj_bias)` and `out_proj` become `MatMul` nodes whose
weight is an initializer holding `W.T` (the optimiser folds the Transpose into a new initializer named `val_<n>`:
the parameter's name is lost, its layout is (in, out)); the biases keep their names. So the map from a target
to its initializer is found by *value*: each candidate initializer of the right shape is compared with the
target after the transform (transpose or not, cast to the initializer's dtype, whole or as the three q/k/v row
blocks of an `in_proj_weight`), bit for bit. A target no initializer holds exactly (folded into another
constant, or stored once for two targets whose values were equal) makes the plan say so, and refit of that
engine is refused.

A plan is recorded in the manifest of every exported Stage C graph (`build["refit_plan"]`) and of a TensorRT
engine built from it; `plan_for` falls back to scanning the graph for engines exported before that.
`refit_engine(engine, model)` writes the model's current target weights into a loaded engine: ONNX Runtime
makes a new session from the same file with those initializers overridden; TensorRT refits the engine in place
(`trt_engine.refit_weights`, engines built with REFIT only). AOTInductor packages need no plan: the loaded
package takes new values for its constants by parameter name (`AOTICompiledModel.load_constants`, torch 2.14).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
from torch import Tensor, nn

from cascade_rt.errors import ConfigError, EngineError
from cascade_rt.export.specs import PRECISIONS
from cascade_rt.models.lora import DEFAULT_FILTERS, lora_targets

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
REFIT_STAGES = ("stage_c", "stage_c_cnet")  # the graphs LoRA targets live in
_PRECISION_OF = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
_SIGNATURE = 16  # leading elements compared before a full comparison


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a target parameter, held by one initializer (transposed or not, in its dtype)."""

    initializer: str
    rows: tuple[int, int]
    transpose: bool
    dtype: str  # 'fp32' | 'fp16' | 'bf16': the initializer's

    def value(self, weight: Tensor) -> Tensor:
        """The initializer's value for `weight` (a target parameter): the plan's exact layout transform."""
        block = weight.detach()[self.rows[0] : self.rows[1]]
        block = block.t() if self.transpose else block
        return block.to(PRECISIONS[self.dtype]).contiguous()


@dataclass(frozen=True)
class TargetPlan:
    param: str  # qualified parameter name in the stage model ('down_blocks.0.2.attention.attn.in_proj_weight')
    pieces: tuple[Piece, ...] = ()
    problem: str | None = None  # why no initializer holds it (then `pieces` is empty)


@dataclass(frozen=True)
class RefitPlan:
    targets: tuple[TargetPlan, ...]
    filters: tuple[str, ...] = DEFAULT_FILTERS

    @property
    def problems(self) -> list[str]:
        return [f"{t.param}: {t.problem}" for t in self.targets if t.problem]

    def check(self, what: str) -> None:
        """Refuse (EngineError naming the targets and the fix) when some target has no recoverable initializer."""
        if not self.targets:
            raise EngineError(f"{what} has no LoRA-targeted weights (filters {list(self.filters)}): nothing to refit")
        if self.problems:
            raise EngineError(
                f"{what} cannot switch LoRAs in place: " + "; ".join(self.problems[:3])
                + (f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else "")
                + "; load the pipeline again with the new --lora (a new engine is exported for it)"
            )

    def initializers(self) -> list[str]:
        return [p.initializer for t in self.targets for p in t.pieces]

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        """Initializer name -> its value for `model`'s current (merged) target weights, in the graph's layout."""
        self.check(type(model).__name__)
        params = dict(model.named_parameters())
        missing = [t.param for t in self.targets if t.param not in params]
        if missing:
            raise ConfigError(f"the refit plan names parameters this model lacks ({missing[:2]}): another model?")
        return {p.initializer: p.value(params[t.param]) for t in self.targets for p in t.pieces}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "filters": list(self.filters),
            "targets": [
                {"param": t.param, "problem": t.problem,
                 "pieces": [{"initializer": p.initializer, "rows": list(p.rows), "transpose": p.transpose,
                             "dtype": p.dtype} for p in t.pieces]}
                for t in self.targets
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RefitPlan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"refit plan version {d.get('version')!r}, this code reads {PLAN_VERSION}")
        targets = tuple(
            TargetPlan(t["param"], tuple(Piece(p["initializer"], tuple(p["rows"]), bool(p["transpose"]), p["dtype"])
                                         for p in t["pieces"]), t.get("problem"))
            for t in d["targets"]
        )
        return cls(targets, tuple(d.get("filters", DEFAULT_FILTERS)))


# ---------------------------------------------------------------------------------------------- graph scan
def _as_torch(tensor: TensorProto, base_dir: Path) -> Tensor:
    if uses_external_data(tensor):
        tensor = TensorProto.FromString(tensor.SerializeToString())  # the graph proto stays without data
        load_external_data_for_tensor(tensor, str(base_dir))
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == TensorProto.BFLOAT16:  # ml_dtypes' bfloat16: reinterpret the bits
        return torch.from_numpy(np.require(array, requirements=["C", "W"]).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _signature(t: Tensor) -> bytes:
    flat = t.reshape(-1)[:_SIGNATURE]
    return flat.view(torch.int16).numpy().tobytes() if flat.dtype == torch.bfloat16 else flat.numpy().tobytes()


class _Initializers:
    """The graph's 2-D float initializers, indexed by (shape, dtype, leading values); values read on demand."""

    def __init__(self, path: Path, shapes: set[tuple[int, ...]]) -> None:
        """Only initializers of `shapes` are read (a full Stage C graph holds 7-14 GB; its targets a sixth)."""
        self.base = path.parent
        proto = onnx.load(str(path), load_external_data=False)
        self.tensors = {t.name: t for t in proto.graph.initializer
                        if tuple(t.dims) in shapes and t.data_type in _PRECISION_OF}
        self.index: dict[tuple, list[str]] = {}
        for name, t in self.tensors.items():
            key = (tuple(t.dims), t.data_type, _signature(_as_torch(t, self.base)))
            self.index.setdefault(key, []).append(name)

    def holding(self, value: Tensor) -> list[str]:
        """Names of the initializers whose value is exactly `value` (same shape, dtype and bits)."""
        for data_type, precision in _PRECISION_OF.items():
            if PRECISIONS[precision] == value.dtype:
                break
        else:
            return []
        names = self.index.get((tuple(value.shape), data_type, _signature(value)), [])
        return [n for n in names if torch.equal(_as_torch(self.tensors[n], self.base), value)]

    def dtypes(self) -> list[str]:
        return sorted({_PRECISION_OF[t.data_type] for t in self.tensors.values()})


def _layouts(weight: Tensor) -> list[tuple[tuple[int, int], ...]]:
    """Row splits to try: the whole weight, then an in_proj_weight's q/k/v blocks (3c x c)."""
    out, inp = weight.shape[:2]
    splits = [((0, out),)]
    if out == 3 * inp:
        splits.append(tuple((i * inp, (i + 1) * inp) for i in range(3)))
    return splits


def _find(weight: Tensor, graph: _Initializers) -> tuple[Piece, ...] | None:
    """The pieces of the first layout whose every row block is held by exactly one initializer."""
    for split in _layouts(weight):
        pieces = []
        for rows in split:
            found = None
            for transpose in (True, False):  # the exporter's MatMul layout first
                for dtype in graph.dtypes():
                    piece = Piece("", rows, transpose, dtype)
                    names = graph.holding(piece.value(weight))
                    if names:
                        found = (names, piece)
                        break
                if found:
                    break
            if found is None:
                break
            names, piece = found
            pieces.append(Piece(names[0], rows, piece.transpose, piece.dtype))
        else:
            return tuple(pieces)
    return None


def make_plan(onnx_path: str | Path, model: nn.Module, filters: Sequence[str] = DEFAULT_FILTERS) -> RefitPlan:
    """The refit plan of the graph at `onnx_path`, exported from `model` (a Stage C with the weights it holds)."""
    start = time.perf_counter()
    targets = lora_targets(model, filters)
    shapes = {tuple(shape) for t in targets for rows in _layouts(t.original())
              for shape in ((rows[0][1] - rows[0][0], t.shape[1]), (t.shape[1], rows[0][1] - rows[0][0]))}
    graph = _Initializers(Path(onnx_path), shapes)
    names = {id(p): n for n, p in model.named_parameters()}
    found: list[tuple[str, tuple[Piece, ...] | None]] = []
    for t in targets:
        param = t.original()
        found.append((names[id(param)], _find(param, graph)))
    owners: dict[str, list[str]] = {}
    for param, pieces in found:
        for p in pieces or ():
            owners.setdefault(p.initializer, []).append(param)
    plans = []
    for param, pieces in found:
        if pieces is None:
            problem = ("no initializer of the graph holds its values (transposed or not, whole or as q/k/v rows): "
                       "the exporter folded it into another constant")
            plans.append(TargetPlan(param, (), problem))
            continue
        shared = sorted({o for p in pieces for o in owners[p.initializer] if o != param})
        if shared:
            problem = (f"its initializer {pieces[0].initializer} also holds {shared[0]} (equal values were stored "
                       "once), so the two cannot take different LoRA deltas")
            plans.append(TargetPlan(param, (), problem))
            continue
        plans.append(TargetPlan(param, pieces))
    plan = RefitPlan(tuple(plans), tuple(filters))
    logger.info("refit plan of %s: %d targets, %d unrecoverable (%.2f s)", Path(onnx_path).name, len(plans),
                len(plan.problems), time.perf_counter() - start)
    return plan


# ---------------------------------------------------------------------------------------------- engines
def plan_for(engine: Any, model: nn.Module) -> RefitPlan:
    """The engine's recorded plan (manifest `build.refit_plan`), else one made from its ONNX graph now."""
    manifest = getattr(engine, "manifest", None)
    recorded = manifest.build.get("refit_plan") if manifest is not None else None
    if recorded:
        return RefitPlan.from_dict(recorded)
    if getattr(engine, "format", "") != "onnxruntime":
        raise EngineError(f"{engine.path.name} records no refit plan; rebuild it (cascade-rt export) to switch "
                          "LoRAs on it")
    return make_plan(engine.path, model)


def refit_engine(engine: Any, model: nn.Module) -> float:
    """Write `model`'s current LoRA-target weights into the loaded `engine`; returns the seconds it took.

    The engine's files and manifest are left as they are (they still describe what the files hold): only the
    engine in memory changes. Refuses (EngineError, ConfigError) where the plan or the format cannot do it."""
    fmt = getattr(engine, "format", "")
    if fmt == "aoti":
        return _load_aoti_constants(engine, model)
    start = time.perf_counter()
    plan = plan_for(engine, model)
    plan.check(engine.path.name)
    weights = plan.weights(model)
    if fmt == "onnxruntime":
        engine.override_initializers(weights)
    elif fmt == "tensorrt":
        from cascade_rt.export.trt_engine import refit_weights

        refit_weights(engine, weights)
    else:
        raise ConfigError(f"engines of format {fmt!r} cannot be refitted")
    seconds = time.perf_counter() - start
    logger.info("refitted %s with %d weights in %.3f s", engine.path.name, len(weights), seconds)
    return seconds


def _load_aoti_constants(engine: Any, model: nn.Module, filters: Sequence[str] = DEFAULT_FILTERS) -> float:
    """AOTInductor: the package's constants are named by the exported module's parameters ('model.<name>');
    the targets' current values replace them in the loaded package (a copy: the model may change after)."""
    start = time.perf_counter()
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {f"model.{names[id(t.original())]}": t.original().detach() for t in lora_targets(model, filters)}
    engine.load_constants(weights)
    seconds = time.perf_counter() - start
    logger.info("loaded %d constants into %s in %.3f s", len(weights), engine.path.name, seconds)
    return seconds
