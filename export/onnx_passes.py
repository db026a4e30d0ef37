"""ONNX graph rewrites for TensorRT's strongly typed networks (the pitfalls of docs/reference.md §8.3).

* Resize: TensorRT has no bf16 Resize. Every Resize whose data is not fp32 gets Cast(fp32) before and a Cast
  back after (our models already interpolate in fp32, so on our graphs this normally finds nothing).
* ConvTranspose: in a strongly typed network the input, weight and bias types must agree; and strongly typed
  bf16 ConvTranspose hits a type-inference gap (TensorRT-Incubator#565). Every ConvTranspose whose input is not
  `convtranspose_dtype` (fp32 by default) is computed in that dtype: input cast in, weight/bias initializers
  converted, output cast back to the original type. The weights involved are small (Stage B's three
  upscalers, Stage A's one, the previewer's three).

Passes work on a ModelProto loaded *without* external data (only the ConvTranspose initializers are read), so
graphs over 2 GB are rewritten without loading their weights; the rewritten graph is saved beside the original
and keeps pointing at the same `.onnx.data` file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from cascade_rt.errors import EngineError

logger = logging.getLogger(__name__)

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value (graph I/O, initializers, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    for v in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def _unique(model: onnx.ModelProto, base: str) -> str:
    taken = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
    taken |= {v.name for v in model.graph.input}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _wrap_in_casts(model: onnx.ModelProto, index: int, input_idx: int, to: int, back: int) -> int:
    """Cast node.input[input_idx] to `to` and node.output[0] back to `back`; returns how many nodes were added."""
    node = model.graph.node[index]
    cast_in = _unique(model, f"{node.input[input_idx]}_to_{TensorProto.DataType.Name(to).lower()}")
    pre = helper.make_node("Cast", [node.input[input_idx]], [cast_in], to=to, name=f"{node.name}_cast_in")
    node.input[input_idx] = cast_in
    out = node.output[0]
    computed = _unique(model, f"{out}_{TensorProto.DataType.Name(to).lower()}")
    node.output[0] = computed
    post = helper.make_node("Cast", [computed], [out], to=back, name=f"{node.name}_cast_out")
    model.graph.node.insert(index + 1, post)
    model.graph.node.insert(index, pre)
    return 2


def cast_resize_io_fp32(model: onnx.ModelProto) -> int:
    """Run every non-fp32 Resize in fp32. Returns the number of Resize nodes rewritten."""
    types = value_types(model)
    changed, i = 0, 0
    while i < len(model.graph.node):
        node = model.graph.node[i]
        dtype = types.get(node.input[0]) if node.op_type == "Resize" else None
        if dtype in FLOAT_TYPES and dtype != TensorProto.FLOAT:
            i += _wrap_in_casts(model, i, 0, TensorProto.FLOAT, dtype)
            changed += 1
        i += 1
    return changed


def _initializer(model: onnx.ModelProto, name: str) -> TensorProto | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def _converted(model: onnx.ModelProto, tensor: TensorProto, to: int, base_dir: Path | None) -> str:
    """A new initializer holding `tensor` converted to `to`; returns its name."""
    if uses_external_data(tensor):
        if base_dir is None:
            raise EngineError(f"initializer {tensor.name} is external data: pass the graph's directory")
        tensor = TensorProto.FromString(tensor.SerializeToString())
        load_external_data_for_tensor(tensor, str(base_dir))
    array = numpy_helper.to_array(tensor).astype(np.float32)
    if to != TensorProto.FLOAT:
        array = array.astype(helper.tensor_dtype_to_np_dtype(to))
    name = _unique(model, f"{tensor.name}_{TensorProto.DataType.Name(to).lower()}")
    new = numpy_helper.from_array(array, name)
    model.graph.initializer.append(new)
    return name


def convtranspose_in_dtype(
    model: onnx.ModelProto, dtype: int = TensorProto.FLOAT, base_dir: str | Path | None = None
) -> int:
    """Compute every ConvTranspose in `dtype` (input, weight and bias agree). Returns how many were rewritten."""
    types = value_types(model)
    base = Path(base_dir) if base_dir is not None else None
    changed, i = 0, 0
    while i < len(model.graph.node):
        node = model.graph.node[i]
        if node.op_type != "ConvTranspose":
            i += 1
            continue
        x_type = types.get(node.input[0])
        params = [_initializer(model, n) for n in node.input[1:] if n]
        if any(p is None for p in params):
            raise EngineError(f"ConvTranspose {node.name}: weight/bias must be initializers for TensorRT")
        if x_type == dtype and all(p.data_type == dtype for p in params):
            i += 1
            continue
        for j, p in enumerate(params, start=1):
            if p.data_type != dtype:
                node.input[j] = _converted(model, p, dtype, base)
        if x_type != dtype:
            i += _wrap_in_casts(model, i, 0, dtype, x_type)
        changed += 1
        i += 1
    return changed


def prepare_for_tensorrt(src: str | Path, dst: str | Path | None = None) -> tuple[Path, dict[str, int]]:
    """Rewrite `src` for a strongly typed TensorRT build; writes `dst` (default `<name>.trt.onnx` beside it)
    only when something changed. Returns the graph to parse and the rewrite counts."""
    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    counts = {
        "resize_cast_to_fp32": cast_resize_io_fp32(model),
        "convtranspose_in_fp32": convtranspose_in_dtype(model, TensorProto.FLOAT, src.parent),
    }
    if not any(counts.values()):
        return src, counts
    dst = Path(dst) if dst is not None else src.with_name(src.stem + ".trt.onnx")
    if dst.parent.resolve() != src.parent.resolve():
        raise EngineError("the rewritten graph must sit beside the original (it shares the external data file)")
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    logger.info("prepared %s for TensorRT: %s", dst.name, counts)
    return dst, counts
