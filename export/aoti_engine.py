"""AOTInductor engine: `torch.export` + `torch._inductor.aoti_compile_and_package` -> one `.pt2` package.

The package holds the compiled kernels (C++ for the CPU, Triton/CUDA for a GPU) and the weights; loading it
(`torch._inductor.aoti_load_package`) needs torch but not the model code. A package runs on the device type it
was compiled for (and, for the CPU, on a CPU with the same vector ISA), which is why its manifest is
device-bound. CPU compilation uses the system C++ compiler (gcc).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from cascade_rt.errors import EngineError
from cascade_rt.export.engine import check_inputs, named_inputs
from cascade_rt.export.graph_modules import stage_graph
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.onnx_export import example_dims, export_dynamic_shapes, heartbeat, model_precision
from cascade_rt.export.specs import PRECISIONS, Dims, StageSpec

logger = logging.getLogger(__name__)


def compile_aoti(
    model: nn.Module,
    spec: StageSpec,
    path: str | Path,
    *,
    dims: Dims,
    dynamic: bool = False,
    device: str | torch.device = "cpu",
) -> float:
    """Export the stage graph and compile it into a `.pt2` package at `path`; returns the seconds it took."""
    precision = model_precision(model)
    spec.check_precision(precision)
    want, have = torch.device(device), next(model.parameters()).device
    if have.type != want.type or (want.index is not None and have.index != want.index):
        logger.warning("AOTInductor: compiling for %s from a copy of the model (it is not on that device)", device)
        model = copy.deepcopy(model).to(device)
    graph = stage_graph(spec.stage, model)
    inputs = spec.sample_inputs(example_dims(spec, dims, dynamic), precision, device=device)
    logger.info("AOTInductor: exporting and compiling %s (%s, %s) for %s", spec.stage, spec.preset, precision, device)
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), heartbeat(f"compiling {Path(path).name}"):
        warnings.simplefilter("ignore")
        program = torch.export.export(
            graph, tuple(inputs.values()), dynamic_shapes=export_dynamic_shapes(spec) if dynamic else None
        )
        out = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    if Path(out) != Path(path) or not Path(path).is_file():
        raise EngineError(f"AOTInductor did not write the package to {path} (got {out})")
    seconds = time.perf_counter() - start
    logger.info("AOTInductor: %s compiled in %.1f s", Path(path).name, seconds)
    return seconds


class AotiEngine:
    format = "aoti"

    def __init__(
        self,
        path: str | Path,
        spec: StageSpec,
        precision: str,
        *,
        manifest: Manifest | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.path, self.spec, self.precision, self.manifest = Path(path), spec, precision, manifest
        built_for = (manifest.device.get("type") if manifest else None) or "cpu"
        self.device = torch.device(device or built_for)
        self.runner = None

    def load(self) -> None:
        if self.runner is not None:
            return
        if not self.path.is_file():
            raise EngineError(f"AOTInductor package {self.path} is missing")
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        try:
            self.runner = torch._inductor.aoti_load_package(str(self.path), device_index=index)
        except Exception as exc:  # corrupt zip, ABI mismatch, wrong device: all refuse the same way
            raise EngineError(f"could not load AOTInductor package {self.path}: {exc}") from exc

    def load_constants(self, weights: Mapping[str, Tensor]) -> None:
        """Replace some of the loaded package's constants (named as the exported module's parameters) with new
        values, cast to the package's precision and device; the file on disk is unchanged (a LoRA switch)."""
        self.load()
        known = set(self.runner.get_constant_fqns())
        unknown = sorted(set(weights) - known)
        if unknown:
            raise EngineError(f"{self.path.name} has no constants {unknown[:3]} (folded into the compiled code?); "
                              "load the pipeline again with the new --lora")
        dtype = PRECISIONS[self.precision]
        values = {k: v.detach().to(self.device, dtype).contiguous() for k, v in weights.items()}
        self.runner.load_constants(values, check_full_update=False)

    def __call__(self, feed: Mapping[str, Tensor] | None = None, /, **kw: Tensor) -> dict[str, Tensor]:
        """Inputs of another float dtype are cast to the engine's."""
        self.load()
        dtypes = self.spec.dtypes(self.precision)
        inputs = {k: v.to(dtypes[k]) if v.is_floating_point() else v for k, v in named_inputs(feed, kw).items()}
        check_inputs(self.spec, self.precision, inputs, self.manifest)
        with torch.inference_mode():
            out = self.runner(*(inputs[n].to(self.device) for n in self.spec.input_names))
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        return dict(zip(self.spec.output_names, out))
