"""ONNX Runtime engine: an exported graph run by an InferenceSession with IO binding.

Execution providers: the CPU EP by default; with onnxruntime-gpu installed and a CUDA device requested, the
TensorRT EP (if present) and the CUDA EP come first, CPU last. Inputs and outputs are bound by pointer to torch
tensors (`IOBinding`), so nothing is copied on the way in or out; output buffers are allocated from the shapes
the spec computes, in the same device as the inputs.

Precision on the CPU EP (measured, onnxruntime 1.31): fp32 runs; fp16 runs (kernels or ORT-inserted casts);
bf16 does not: the CPU EP has no bf16 Conv/MatMul/LayerNormalization kernels, and a bf16 graph below opset 22
does not even load. Engines for ORT on the CPU are therefore exported in fp32 (the default of
`cascade-rt export --format onnxruntime`); bf16 graphs are for TensorRT (or ORT's CUDA/TensorRT EPs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor

from cascade_rt.errors import BackendUnavailable, EngineError
from cascade_rt.export.engine import check_inputs, named_inputs
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.onnx_export import ONNX_DTYPES
from cascade_rt.export.specs import StageSpec

logger = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")
CPU_PRECISIONS = ("fp32", "fp16")


def choose_providers(device: str | torch.device = "cpu", *, tensorrt: bool = True) -> list[str]:
    available = ort.get_available_providers()
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available or not torch.cuda.is_available():
            raise BackendUnavailable(
                "ONNX Runtime on CUDA needs onnxruntime-gpu and a GPU (pip install 'cascade-rt[gpu]'); "
                f"available providers: {available}"
            )
        chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if tensorrt and "TensorrtExecutionProvider" in available:
            chosen.insert(0, "TensorrtExecutionProvider")
        return chosen
    return ["CPUExecutionProvider"]


def session_options(opt_level: str = "all", intra_op_threads: int | None = None):
    if opt_level not in OPT_LEVELS:
        raise ValueError(f"opt_level must be one of {OPT_LEVELS}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    so.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only
    return so


class OrtEngine:
    format = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        spec: StageSpec,
        precision: str,
        *,
        manifest: Manifest | None = None,
        device: str | torch.device = "cpu",
        intra_op_threads: int | None = None,
        opt_level: str = "all",
    ) -> None:
        self.path, self.spec, self.precision, self.manifest = Path(path), spec, precision, manifest
        self.device = torch.device(device)
        self.intra_op_threads, self.opt_level = intra_op_threads, opt_level
        self.session = None
        self.providers: list[str] = []
        self._overrides: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}  # kept alive as long as the session

    def load(self) -> None:
        if self.session is not None:
            return

        if self.device.type == "cpu" and self.precision not in CPU_PRECISIONS:
            raise BackendUnavailable(
                f"ONNX Runtime's CPU provider cannot run {self.precision} graphs ({self.path.name}): "
                "export with --dtype fp32 for onnxruntime on the CPU"
            )
        if not self.path.is_file():
            raise EngineError(f"ONNX graph {self.path} is missing")
        self.providers = choose_providers(self.device)
        self.session = self._session(self._overrides)
        logger.debug("loaded %s with %s", self.path.name, self.session.get_providers())

    def _session(self, overrides: Mapping[str, tuple[np.ndarray, ort.OrtValue]]):
        options = session_options(self.opt_level, self.intra_op_threads)
        for name, (_, value) in overrides.items():
            options.add_initializer(name, value)
        try:
            return ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented)
            raise EngineError(f"ONNX Runtime could not load {self.path}: {exc}") from exc

    def override_initializers(self, weights: Mapping[str, Tensor]) -> None:
        """A new session from the same graph file with these initializers' values replaced (the graph is not
        exported again, the file is not changed): how a LoRA switch reaches an ORT engine (export/refit.py).
        Replaces any earlier overrides; the session uses the arrays in place, so they live as long as it does."""
        unknown = sorted(set(weights) - self._initializer_names())
        if unknown:
            raise EngineError(f"{self.path.name} has no initializers {unknown[:3]}; its refit plan is stale: "
                              "re-export the engine")
        overrides = {}
        for name, t in weights.items():
            array = t.detach().cpu().clone(memory_format=torch.contiguous_format)  # never the live parameter
            if array.dtype == torch.bfloat16:  # numpy has no bf16: hand ORT the bits with their ONNX type
                bits = array.view(torch.int16).numpy()
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, ONNX_DTYPES[torch.bfloat16])
                overrides[name] = (bits, value)
            else:
                values = array.numpy()  # shares the tensor's memory; ORT's value points at it
                overrides[name] = (values, ort.OrtValue.ortvalue_from_numpy(values))
        self.load()  # checks and providers; the old session serves until the new one exists
        self.session, self._overrides = self._session(overrides), overrides

    def _initializer_names(self) -> set[str]:
        return {t.name for t in onnx.load(str(self.path), load_external_data=False).graph.initializer}

    def options(self) -> dict:
        return {"opt_level": self.opt_level, "intra_op_threads": self.intra_op_threads, "providers": self.providers}

    def __call__(self, feed: Mapping[str, Tensor] | None = None, /, **kw: Tensor) -> dict[str, Tensor]:
        """Inputs of another float dtype are cast to the engine's (documented: ORT on the CPU runs fp32)."""
        self.load()
        dtypes = self.spec.dtypes(self.precision)
        inputs = {k: v.to(dtypes[k]) if v.is_floating_point() else v for k, v in named_inputs(feed, kw).items()}
        values = check_inputs(self.spec, self.precision, inputs, self.manifest)
        dev_type, dev_id = self.device.type, self.device.index or 0
        binding = self.session.io_binding()
        keep = []
        for name in self.spec.input_names:
            t = inputs[name].to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, dev_type, dev_id, ONNX_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
        outputs = {}
        for name, shape in self.spec.output_shapes(values).items():
            out = torch.empty(shape, dtype=dtypes[name], device=self.device)
            binding.bind_output(name, dev_type, dev_id, ONNX_DTYPES[out.dtype], tuple(out.shape), out.data_ptr())
            outputs[name] = out
        self.session.run_with_iobinding(binding)
        return outputs
