"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on a machine without a GPU.

Triton compiles for a ``GPUTarget`` without a device: ``triton.compile(ASTSource(...), target=...)`` lowers to
PTX and runs the ``ptxas`` that ships with Triton, whose ``-v`` report gives registers, spill bytes and shared
memory. This module does that for the launches the released models really make:

1. ``traced(model, res, batch, dtype)``: each released preset is built on the ``meta`` device, the ``triton``
   backend is applied and the model runs once; the autotuned kernels are swapped for recorders, so every
   launcher computes its own arguments (the autotune key, the constexprs, the grid). gelu_grn's SPLIT needs an
   SM count: an H100's 132.
2. ``kept(kernel, launch)``: the kernel's full GPU config list pruned by its own ``early_config_prune``
   predicate, as the autotuner calls it.
3. ``compile_jobs(...)``: one job per (kernel, specialisation, config, target), deduplicated exactly as Triton's
   JIT cache keys them (signature, constexprs, 16-byte divisibility attributes, options); the specialisation is
   computed by Triton's own binder (``create_function_from_signature``) from stand-ins of the launch arguments.
4. ``run_jobs(jobs)``: compiles them (a process pool, a Triton cache directory of its own) and returns
   registers, spill stores/loads and shared memory per job.

Compilation needs the real ``triton.jit`` kernels, so it runs in processes where ``TRITON_INTERPRET`` is unset
(``run_jobs`` starts them so; under the interpreter the traced launches are still available). The CI test is
``tests/kernels/test_gpu_compile.py``; the full matrix with its table is ``benchmarks/kernel_compile_report.py``
(docs/kernels.md shows the recorded table).
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import torch
import triton

from . import _common
from . import attention as attn_mod
from . import dwconv_layernorm as dwln_mod
from . import gelu_grn as grn_mod
from . import modulation as mod_mod
from . import stage_a_block as sa_mod

H100_SMS = 132  # H100 SXM: the SM count gelu_grn's split is sized for when traced
MODELS = ("stage_c", "stage_c_lite", "stage_b", "stage_b_lite", "stage_a")
# compute capability -> (name, shared memory per block with opt-in, bytes): what a kernel may use at launch
TARGETS = {90: ("sm_90 H100/H200", 227 * 1024), 80: ("sm_80 A100", 163 * 1024), 86: ("sm_86 RTX 30xx/A10", 99 * 1024),
           89: ("sm_89 RTX 40xx/L4/L40S", 99 * 1024), 87: ("sm_87 Jetson Orin", 163 * 1024)}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    module: object
    attr: str  # the autotuned kernel's module attribute
    gpu_configs: Callable[[], list]  # the full GPU list, as the kernel module exposes it
    predicate: Callable  # its early_config_prune predicate


KERNELS = (
    KernelSpec("attention", attn_mod, "_attention_kernel", attn_mod._gpu_configs, attn_mod._keep),
    KernelSpec("gelu_grn_stats", grn_mod, "_gelu_grn_stats_kernel", grn_mod._gpu_tile_configs, grn_mod._keep_tile),
    KernelSpec("gelu_grn_apply", grn_mod, "_gelu_grn_apply_kernel", grn_mod._gpu_tile_configs, grn_mod._keep_tile),
    KernelSpec("dwconv_layernorm", dwln_mod, "_dwconv_layernorm_kernel", dwln_mod._gpu_configs, dwln_mod._keep),
    KernelSpec("modulation", mod_mod, "_modulation_kernel", mod_mod._gpu_configs, mod_mod._keep),
    # not autotuned: launched with num_warps=4 and the default num_stages; its BLOCK comes from the launcher
    KernelSpec("gelu_grn_finalize", grn_mod, "_gelu_grn_finalize_kernel",
               lambda: [triton.Config({}, num_warps=4, num_stages=3)], lambda cfg, args: True),
    KernelSpec("layernorm_modulate", sa_mod, "_layernorm_modulate_kernel", sa_mod._ln_gpu_configs, sa_mod._ln_keep),
    KernelSpec("dwconv_replicate_residual", sa_mod, "_dwconv_replicate_residual_kernel", sa_mod._conv_gpu_configs,
               sa_mod._conv_keep),
)
BY_NAME = {k.name: k for k in KERNELS}
ORIGINAL = {k.name: getattr(k.module, k.attr) for k in KERNELS}  # triton.autotune objects (finalize: a jit)


def jit_function(name: str):
    """The ``triton.jit`` function of a kernel (inside its autotuner, if it has one)."""
    obj = ORIGINAL[name]
    return obj.fn if hasattr(obj, "configs") else obj


# ------------------------------------------------------------------------------------------------ tracing
@dataclass(frozen=True)
class Launch:
    kernel: str
    args: dict  # named args (tensors included) + the launcher's keyword constexprs, as the prune hook sees them
    nargs: dict  # positional args by name (the hook's ``named_args``)
    kwargs: dict  # keyword args of the launch (the hook's ``**kwargs``)
    grid: Callable


class _Recorder:
    def __init__(self, name: str, kernel, sink: list) -> None:
        self.name, self.arg_names, self.sink = name, kernel.arg_names, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            nargs = dict(zip(self.arg_names, args))
            self.sink.append(Launch(self.name, {**nargs, **kwargs}, nargs, kwargs, grid))
        return launch


_DEFAULT_SPLIT = grn_mod._default_split


def _h100_split(bsz: int, p: int, c: int, device) -> int:
    """gelu_grn's own ``_default_split``, taking its GPU branch with an H100's SM count."""
    props = SimpleNamespace(multi_processor_count=H100_SMS)
    with mock.patch.object(grn_mod, "interpreting", lambda: False), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda d: props):
        return _DEFAULT_SPLIT(bsz, p, c, torch.device("cuda"))


def _key(launch: Launch):
    def desc(v):
        return ("tensor", tuple(v.shape), v.dtype, v.storage_offset()) if isinstance(v, torch.Tensor) else v
    return launch.kernel, tuple((k, desc(v)) for k, v in launch.args.items())


@functools.cache
def traced(model: str, res: int, batch: int, dtype: torch.dtype) -> tuple[Launch, ...]:
    """Every autotuned launch of one denoiser step (Stage A: one decode), deduplicated, in call order."""
    from cascade_rt.models.presets import build_model
    from cascade_rt.models.text import ClipTextConfig
    from cascade_rt.stages import latent_shapes

    from .backend import apply_triton_kernels

    sink: list[Launch] = []
    net = apply_triton_kernels(build_model(model, device="meta", dtype=dtype))
    shapes = latent_shapes(batch, res, res)
    with ExitStack() as stack:
        for k in KERNELS:
            stack.enter_context(mock.patch.object(k.module, k.attr, _Recorder(k.name, ORIGINAL[k.name], sink)))
        stack.enter_context(mock.patch.object(grn_mod, "_default_split", _h100_split))
        # meta tensors pass the launchers' "must be CUDA" check only in interpreter mode (the config lists were
        # picked at import and are not re-read)
        stack.enter_context(mock.patch.object(_common, "interpreting", lambda: True))
        stack.enter_context(mock.patch.object(grn_mod, "interpreting", lambda: False))  # finalize's GPU BLOCK
        with torch.no_grad(), torch.device("meta"):
            r = torch.rand(batch)
            if model.startswith("stage_c"):
                text = torch.empty(batch, ClipTextConfig.context_length, net.clip_txt_mapper.in_features)
                pooled = torch.empty(batch, 1, net.clip_txt_pooled_mapper.in_features)
                img = torch.empty(batch, 1, net.clip_img_mapper.in_features)  # the pipeline's one image embedding
                net(torch.empty(shapes["c"]), r, text, pooled, img)
            elif model.startswith("stage_b"):
                net(torch.empty(shapes["b"]), r, torch.empty(shapes["c"]),
                    torch.empty(batch, 1, net.clip_mapper.in_features))
            else:
                net.decode(torch.empty(shapes["b"]))
    unique = {}
    for launch in sink:
        unique.setdefault(_key(launch), launch)
    return tuple(unique.values())


def kept(kernel: KernelSpec, launch: Launch) -> list[triton.Config]:
    """The configs the autotuner would benchmark for this launch (its prune predicate over the full GPU list)."""
    return [c for c in kernel.gpu_configs() if kernel.predicate(c, launch.args)]


# ------------------------------------------------------------------------------------------ specialisation
class _ArgStandIn:
    """What Triton's binder reads of a tensor argument: its dtype and its address (alignment only)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self._ptr = 1024 + t.storage_offset() * t.element_size()  # allocations are 256-byte aligned

    def data_ptr(self) -> int:
        return self._ptr


@dataclass
class Job:
    kernel: str
    target: int  # compute capability, e.g. 90
    config: str  # str(triton.Config)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    launches: list = field(default_factory=list)  # "model res bdtype" labels of the launches that use it
    shapes: list = field(default_factory=list)  # launch-shape ids (see ``shape_id``) whose kept list includes it

    @property
    def key(self) -> str:
        return json.dumps([self.kernel, self.target, self.signature, sorted(map(str, self.constexprs.items())),
                           sorted(map(str, self.attrs.items())), self.options["num_warps"],
                           self.options["num_stages"]], default=str)


def shape_id(launch: Launch, dtype: torch.dtype) -> str:
    """A launch shape as the autotuner sees it: the kernel, its autotune key values and the dtype."""
    keys = getattr(ORIGINAL[launch.kernel], "keys", None) or ["C", "SPLIT"]  # finalize: no autotune key
    return f"{launch.kernel}[{', '.join(f'{k}={launch.args[k]}' for k in keys)}, {str(dtype).split('.')[-1]}]"


def _specialise(kernel: KernelSpec, launch: Launch, cfg: triton.Config, target: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = jit_function(kernel.name)
    if not isinstance(fn, JITFunction):  # under the interpreter: the JIT view of the same source (binding only)
        fn = JITFunction(fn.fn)
    backend = make_backend(GPUTarget("cuda", target, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    nargs = {k: _ArgStandIn(v) if isinstance(v, torch.Tensor) else v for k, v in launch.nargs.items()}
    kwargs = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}  # the config's win
    kwargs.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bound, specialization, options = binder(**nargs, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    opts = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    return signature, {str(k): v for k, v in constexprs.items()}, {str(k): v for k, v in attrs.items()}, opts


def launch_matrix(res: int = 1024, batch: int = 2, dtypes=(torch.bfloat16, torch.float32), models=MODELS):
    """(kernel spec, launch, dtype, label) for every distinct traced launch of the released models."""
    out = []
    for model in models:
        for dtype in dtypes:
            for launch in traced(model, res, batch, dtype):
                out.append((BY_NAME[launch.kernel], launch, dtype, f"{model} {res} b{batch} {str(dtype)[6:]}"))
    return out


def compile_jobs(targets_all=(90,), targets_one=(80, 86, 89, 87), res: int = 1024, batch: int = 2,
                 dtypes=(torch.bfloat16, torch.float32), models=MODELS) -> list[Job]:
    """Jobs, deduplicated by specialisation: every kept config for ``targets_all``; for ``targets_one`` one
    config per (kernel, dtype, constexpr specialisation): the kept config with the largest register tile and
    the most pipeline stages, the one most likely to fail."""
    jobs: dict[str, Job] = {}

    def add(kernel, launch, dtype, label, cfg, target):
        sig, cx, attrs, opts = _specialise(kernel, launch, cfg, target)
        job = Job(kernel.name, target, str(cfg), sig, cx, attrs, opts)
        job = jobs.setdefault(job.key, job)
        if label not in job.launches:
            job.launches.append(label)
        sid = shape_id(launch, dtype)
        if sid not in job.shapes:
            job.shapes.append(sid)

    matrix = launch_matrix(res, batch, dtypes, models)
    for kernel, launch, dtype, label in matrix:
        for cfg in kept(kernel, launch):
            for target in targets_all:
                add(kernel, launch, dtype, label, cfg, target)
    if targets_one:
        groups: dict = {}
        for kernel, launch, dtype, label in matrix:
            consts = tuple(sorted((k, str(v)) for k, v in launch.kwargs.items()))
            for cfg in kept(kernel, launch):
                weight = (_tile(cfg, launch.args), cfg.num_stages, cfg.num_warps)
                best = groups.get((kernel.name, dtype, consts))
                if best is None or weight > best[0]:
                    groups[(kernel.name, dtype, consts)] = (weight, kernel, launch, dtype, label, cfg)
        for _, kernel, launch, dtype, label, cfg in groups.values():
            for target in targets_one:
                add(kernel, launch, dtype, label, cfg, target)
    return list(jobs.values())


def _tile(cfg: triton.Config, args: dict) -> int:
    """The number of elements in a kernel's main register tile (the product of its block sizes)."""
    n = 1
    for k, v in {**args, **cfg.kwargs}.items():
        if k.startswith("BLOCK") and k not in ("BLOCK_S",) and isinstance(v, int):
            n *= v
    return n


# ---------------------------------------------------------------------------------------------- compiling
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log: str) -> dict:
    """Registers, spill store/load bytes and stack frame from a ``ptxas -v`` report of one kernel."""
    regs, spill, stack = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log), _PTXAS_STACK.search(log)
    if regs is None:
        raise ValueError(f"no register count in the ptxas report:\n{log}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0, "stack_frame": int(stack.group(1)) if stack else 0}


def _inspection_hook():
    """Triton's ``add_stages_inspection_hook``: the cubin stage also keeps ptxas's ``-v`` report in the metadata
    (so a cache hit still has it)."""
    import contextlib
    import io

    from triton import knobs

    def hook(backend=None, stages=None, options=None, language=None, capability=None):
        if backend is None:  # called by the JIT for its cache key
            return "cascade-rt-ptxas-log", "1"
        make_cubin = stages["cubin"]

        def cubin(src, metadata):
            buf = io.StringIO()
            old = knobs.nvidia.dump_ptxas_log
            knobs.nvidia.dump_ptxas_log = True
            try:
                with contextlib.redirect_stdout(buf):
                    out = make_cubin(src, metadata)
            finally:
                knobs.nvidia.dump_ptxas_log = old
            metadata["ptxas_log"] = buf.getvalue()
            return out

        stages["cubin"] = cubin
    return hook


def compile_one(job: dict) -> dict:
    """Compile one job (a ``Job`` as a dict) and return its numbers, or the error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.runtime.add_stages_inspection_hook = _inspection_hook()
    fn = jit_function(job["kernel"])
    constexprs = {_path(k): v for k, v in job["constexprs"].items()}
    attrs = {_path(k): v for k, v in job["attrs"].items()}
    res = {"key": job["key"]}
    try:
        kernel = triton.compile(ASTSource(fn, job["signature"], constexprs, attrs),
                                target=GPUTarget("cuda", job["target"], 32), options=dict(job["options"]))
        res.update(parse_ptxas(kernel.metadata.ptxas_log))
        res["shared"] = int(kernel.metadata.shared)
        res["ok"] = True
    except Exception as exc:  # a compile error is a result: reported, and the test fails on it
        res.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
    return res


def _path(k: str):
    return tuple(int(x) for x in k.strip("()").split(",") if x.strip())


def _worker(job_file: str, out_file: str, cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    with open(job_file) as f, open(out_file, "w") as out:
        for job in json.load(f):
            out.write(json.dumps(compile_one(job)) + "\n")
            out.flush()


def default_cache_dir() -> str:
    """The Triton cache of these compiles: a folder under the temp dir, kept between runs."""
    return os.path.join(tempfile.gettempdir(), "cascade-rt-triton-aot-cache")


def _child_setup(nice: int) -> None:
    """In a compile worker before exec: lower its priority, and end it when its parent dies (Linux)."""
    os.nice(nice)
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the worker finishes its list on its own
        pass


def run_jobs(jobs: list[Job], *, workers: int = 2, cache_dir: str | None = None, nice: int = 10,
             timeout: float | None = None) -> list[dict]:
    """Compile ``jobs`` in ``workers`` fresh processes (``TRITON_INTERPRET`` unset, ``nice``d), with the Triton
    cache in ``cache_dir`` (default: a directory under the system temp dir kept between runs). Returns one result
    per job, in order: ``{ok, registers, spill_stores, spill_loads, stack_frame, shared}`` or ``{ok: False, error}``."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    # heaviest first (attention fp32), round robin: the workers finish together
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].kernel != "attention", -len(jobs[i].shapes)))
    parts = [[i for n, i in enumerate(order) if n % workers == w] for w in range(workers)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for w, part in enumerate(parts):
            if not part:
                continue
            jf, of = os.path.join(tmp, f"jobs{w}.json"), os.path.join(tmp, f"out{w}.jsonl")
            with open(jf, "w") as f:
                json.dump([{**asdict(jobs[i]), "key": jobs[i].key} for i in part], f, default=str)
            cmd = [sys.executable, "-c", "import sys; from cascade_rt.kernels.gpu_compile import _worker; "
                   "_worker(*sys.argv[1:])", jf, of, cache_dir]
            procs.append((part, of, subprocess.Popen(cmd, env=env, preexec_fn=functools.partial(_child_setup, nice),
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        for part, of, proc in procs:
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            lines = open(of).read().splitlines() if os.path.exists(of) else []
            for i, line in zip(part, lines):
                results[i] = json.loads(line)
            for i in part[len(lines):]:
                results[i] = {"ok": False, "error": f"not compiled: the worker exited ({proc.returncode}): "
                                                    f"{err.decode(errors='replace')[-1500:]}"}
    return [results[i] for i in range(len(jobs))]


def all_spilling_shapes(jobs: list[Job], results: list[dict], target: int = 90) -> list[str]:
    """Launch shapes (``shape_id``) for which every kept config compiled for ``target`` spills registers."""
    clean: dict[str, bool] = {}
    for job, res in zip(jobs, results):
        if job.target != target:
            continue
        spills = not res.get("ok") or res["spill_stores"] > 0 or res["spill_loads"] > 0
        for sid in job.shapes:
            clean[sid] = clean.get(sid, False) or not spills
    return sorted(s for s, ok in clean.items() if not ok)
