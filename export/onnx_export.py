"""ONNX export of every stage graph (`graphs.py`) to the tensors a `StageSpec` names.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). Measured on this code base
(torch 2.14, see tests/export): it exports SDPA, PixelUnshuffle/PixelShuffle (SpaceToDepth/DepthToSpace),
bilinear align_corners Resize, ConvTranspose, native LayerNormalization, erf GELU and bf16 weights, and its
Stage B graph matches eager to 2e-4 in fp32, whereas the TorchScript exporter (`dynamo=False`) produced a
Stage B graph off by 0.1 (and cannot trace the padded cond_kv unpacking), so the TorchScript path is not used.

Opsets: 18 for fp32/fp16 graphs (LayerNormalization is native from 17); 22 for bf16 graphs, the first opset
whose Conv/ConvTranspose schemas allow bfloat16 (at 18 a bf16 Conv is an invalid model that ONNX Runtime
refuses to load). Graphs whose weights exceed `EXTERNAL_DATA_BYTES` keep them in one `<name>.onnx.data` file
beside the graph (protobuf cannot hold more than 2 GiB; full Stage C is 7 GB in bf16).
Every graph is checked with `onnx.checker.check_model(path, full_check=True)` (path-based, so > 2 GB works)
and strict shape inference, and its inputs/outputs are compared with the spec.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.export import Dim

from cascade_rt.errors import ConfigError, EngineError
from cascade_rt.export.graph_modules import stage_graph
from cascade_rt.export.specs import BATCH_MAX, Dims, StageSpec, parse_dim
from cascade_rt.stages import RESOLUTION_MAX, RESOLUTION_MIN, RESOLUTION_STEP, stage_c_latent_hw

logger = logging.getLogger(__name__)

OPSETS = {"fp32": 18, "fp16": 18, "bf16": 22}
EXTERNAL_DATA_BYTES = 1 << 30  # 1 GiB: well below protobuf's 2 GiB limit
ONNX_DTYPES = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
    torch.int64: onnx.TensorProto.INT64,
    torch.int32: onnx.TensorProto.INT32,
}


@dataclass
class OnnxExport:
    path: Path
    files: list[Path]
    opset: int
    external_data: bool
    seconds: float
    weight_bytes: int
    ops: list[str] = field(default_factory=list)


def model_precision(model: nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    names = {v: k for k, v in {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.items()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        raise ConfigError(f"the model's parameters must share one float dtype, found {sorted(map(str, dtypes))}")
    return names[dtypes.pop()]


def export_dynamic_shapes(spec: StageSpec) -> tuple[dict[int, object], ...]:
    """torch.export dims for every symbolic input axis, in input order. Image-sized axes are multiples of 128 px, so the
    Stage B/A latent is 32*k and x_add 16*k for one shared k per side (Stage B's 3 stride-2 levels stay exact)."""
    k_lo, k_hi = RESOLUTION_MIN // RESOLUTION_STEP, RESOLUTION_MAX // RESOLUTION_STEP
    c_lo, c_hi = stage_c_latent_hw(RESOLUTION_MIN, 1)[0], stage_c_latent_hw(RESOLUTION_MAX, 1)[0]
    roots = {
        "N": (Dim("N", min=1, max=2 * BATCH_MAX), 1),
        "hc": (Dim("hc", min=c_lo, max=c_hi), 1),
        "wc": (Dim("wc", min=c_lo, max=c_hi), 1),
    }
    kh, kw = Dim("kh", min=k_lo, max=k_hi), Dim("kw", min=k_lo, max=k_hi)
    roots.update({"hb": (kh, 32), "wb": (kw, 32), "H": (kh, 128), "W": (kw, 128)})
    shapes: dict[str, dict[int, object]] = {}
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                sym, mul, div = parse_dim(d)
                root, scale = roots[sym]
                factor, rem = divmod(scale * mul, div)
                if rem:
                    raise ConfigError(f"axis {d!r} of {t.name} is not an integer multiple of a root dimension")
                axes[i] = root if factor == 1 else factor * root
        shapes[t.name] = axes
    return tuple(shapes[n] for n in spec.input_names)


def example_dims(spec: StageSpec, dims: Dims, dynamic: bool) -> Dims:
    """Dynamic export needs every dynamic example size >= 2 (torch.export specialises 0 and 1)."""
    if dynamic and spec.symbol_values(dims)["N"] < 2:
        return Dims(2, dims.height, dims.width, dims.cfg)
    return dims


@contextlib.contextmanager
def heartbeat(what: str, every: float = 30.0):
    """Log 'still working' every `every` seconds while a long step (export, compile, build) runs."""
    stop, start = threading.Event(), time.perf_counter()

    def beat() -> None:
        while not stop.wait(every):
            logger.info("%s: still working (%.0f s)", what, time.perf_counter() - start)

    thread = threading.Thread(target=beat, name="export-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING):
    """The exporter's optimiser logs every pass at INFO; keep our progress log readable (restored after)."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def _rename_io_dims(model, spec: StageSpec) -> None:
    """Give the graph's inputs/outputs the spec's dimension names ('N', 'hc', 'hb/2', ...)."""
    import onnx_ir as ir  # 2 s to import: only when exporting

    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.inputs, *model.graph.outputs):
        t = tensors[value.name]
        old = list(value.shape) if value.shape is not None else [None] * len(t.shape)
        value.shape = ir.Shape([d if isinstance(d, str) else o for d, o in zip(t.shape, old)])


def export_onnx(
    model: nn.Module,
    spec: StageSpec,
    path: str | Path,
    *,
    dims: Dims,
    dynamic: bool = False,
    opset: int | None = None,
    optimize: bool = True,
) -> OnnxExport:
    """Export `spec.stage` of `model` (already in the precision to export) to `path` and check it."""
    precision = model_precision(model)
    spec.check_precision(precision)
    opset = opset or OPSETS[precision]
    path = Path(path)
    graph = stage_graph(spec.stage, model)
    inputs = spec.sample_inputs(example_dims(spec, dims, dynamic), precision)
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    logger.info(
        "exporting %s (%s, %s, %s shapes, %.2f GB of weights) to %s",
        spec.stage, spec.preset, precision, "dynamic" if dynamic else "static", weight_bytes / 1e9, path,
    )
    start = time.perf_counter()
    quiet = quiet_loggers("onnx_ir", "onnxscript")
    with warnings.catch_warnings(), quiet, heartbeat(f"exporting {path.name}"), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            tuple(inputs.values()),
            dynamo=True,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=export_dynamic_shapes(spec) if dynamic else None,
            optimize=optimize,
            verbose=False,
        )
        _rename_io_dims(program.model, spec)
        external = weight_bytes > EXTERNAL_DATA_BYTES
        path.parent.mkdir(parents=True, exist_ok=True)
        program.save(path, external_data=external)
        del program
    seconds = time.perf_counter() - start
    ops = check_onnx(path, spec, precision)
    files = [path] + ([path.with_name(path.name + ".data")] if external else [])
    for f in files:
        if not f.is_file():
            raise EngineError(f"the exporter did not write {f}")
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in files)
    logger.info("exported %s in %.1f s (%s)", path.name, seconds, sizes)
    return OnnxExport(path, files, opset, external, seconds, weight_bytes, ops)


def check_onnx(path: str | Path, spec: StageSpec, precision: str) -> list[str]:
    """onnx.checker (full) + strict shape inference + I/O names/dtypes/ranks = the spec. Returns the op types."""
    path = str(path)
    try:
        onnx.checker.check_model(path, full_check=True)
        proto = onnx.load(path, load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EngineError(f"{path} is not a valid ONNX graph: {exc}") from exc
    dtypes = spec.dtypes(precision)
    io = (("input", inferred.graph.input, spec.inputs), ("output", inferred.graph.output, spec.outputs))
    for kind, values, tensors in io:
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            raise EngineError(f"{path}: graph {kind}s {names} differ from the spec {[t.name for t in tensors]}")
        for v, t in zip(values, tensors):
            tt = v.type.tensor_type
            if tt.elem_type != ONNX_DTYPES[dtypes[t.name]]:
                raise EngineError(f"{path}: {kind} {t.name} has ONNX type {tt.elem_type}, spec says {dtypes[t.name]}")
            got = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            if len(got) != len(t.shape) or any(isinstance(s, int) and g != s for g, s in zip(got, t.shape)):
                raise EngineError(f"{path}: {kind} {t.name} has shape {got}, spec says {list(t.shape)}")
    return sorted({n.op_type for n in proto.graph.node})
