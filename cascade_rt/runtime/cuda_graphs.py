"""CUDA graphs of the whole denoising step: model, CFG, rho rescale and the GDF update, with no host sync.

`GraphedSampler` is a drop-in for `sampling.run_plan`. Per shape key (`GraphKey`: stage, batch, latent
height/width, dtype, plus CFG on/off, stochastic, whole-loop) it owns one `StaticStep`: static input buffers
allocated once (x, x0, the schedule rows, the pre-drawn noise of every step, cfg/rho, the batched conditioning)
and an in-place step over them. The step reads its coefficients with a *device* step counter
(`schedule.index_select(1, step)`) and increments it inside the graph, so replaying the same graph `steps`
times walks the schedule without the host touching a tensor value. Noise for all steps is drawn up front, in the
eager sampler's order and with its generator, into a static buffer: replay equals `run_plan` bit for bit in
principle (same kernels; tests assert it to fp32 rounding).

The CUDA-graph pattern is the vLLM/SGLang one: ≥2 warm-up runs on a side stream before capture (autotuning,
compilation and lazy init never land in a graph), one memory pool shared by all graphs of a sampler group
(capture the largest shape first: `Pipeline.warmup` sorts), graphs in a dict keyed by the frozen `GraphKey`,
optional capture of the whole stage loop as one graph, and a debug mode that checks the static buffers and the
weights did not move. An uncaptured key (after `freeze()`, or when capture failed) runs the eager sampler with
one warning per key. Weights that moved (sequential memory mode) invalidate the sampler's graphs; they are
captured again on the next call.

mode="static" runs the very same static-buffer step without graphs: the CPU twin the tests compare with
`sample_stage`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from cascade_rt.errors import ConfigError, EngineError
from cascade_rt.sampling import (
    StagePlan,
    StepCoeffs,
    concat_conditioning,
    draw_noise,
    run_plan,
    sample_stage,
    sampler_step,
)

logger = logging.getLogger(__name__)

MODES = ("graph", "static")
SCHEDULE_ROWS = ("r", "a", "b", "a_next", "c_eps", "sigma")  # StepCoeffs order


@dataclass(frozen=True)
class GraphKey:
    """Everything a captured step depends on besides values: a shape descriptor, hashable and frozen."""

    stage: str
    batch: int  # images; the model sees 2*batch when `guided`
    height: int  # latent height/width of this stage (x.shape[-2:])
    width: int
    dtype: torch.dtype  # the conditioning (= model compute) dtype
    guided: bool = True  # CFG: one model call on [cond; uncond]
    stochastic: bool = True  # the update adds noise (eta > 0)
    loop_steps: int = 0  # 0: one graph per step, replayed `steps` times; N: all N steps in one graph

    @property
    def model_batch(self) -> int:
        return self.batch * (2 if self.guided else 1)

    @property
    def size(self) -> int:
        """Sort key for "largest first": elements of the model's input (then whole-loop graphs first)."""
        return self.model_batch * self.height * self.width


class StaticStep:
    """Static buffers of one `GraphKey` and the in-place step over them.

    `step()` allocates only temporaries (which a graph takes from its pool), reads nothing on the host, and
    leaves its results in `x` (next sample), `x0` (prediction) and `step_index` (+1).
    """

    def __init__(
        self,
        key: GraphKey,
        denoise: Callable[..., Tensor],
        inputs: Mapping[str, Any],
        channels: int,
        max_steps: int,
        device: torch.device,
    ) -> None:
        self.key, self.denoise, self.max_steps = key, denoise, max_steps
        shape = (key.batch, channels, key.height, key.width)
        f32 = dict(device=device, dtype=torch.float32)
        self.x = torch.zeros(shape, **f32)
        self.x0 = torch.zeros(shape, **f32)
        self.noise = torch.zeros((max_steps, *shape), **f32) if key.stochastic else None
        self.schedule = torch.zeros((len(SCHEDULE_ROWS), max_steps), **f32)
        self.step_index = torch.zeros(1, device=device, dtype=torch.long)
        self.cfg_rho = torch.zeros(3, **f32)  # cfg, rho, 1 - rho (1 - rho computed on the host, as eager does)
        leaves, self._spec = tree_flatten(dict(inputs))
        self._leaves = [t.detach().clone() if isinstance(t, Tensor) else t for t in leaves]
        self.inputs = tree_unflatten(self._leaves, self._spec)
        self.signature = input_signature(inputs)

    # -------------------------------------------------------------- host side: fill the buffers (no sync)
    def load(self, x: Tensor, plan: StagePlan, inputs: Mapping[str, Any], cfg: float, rho: float) -> None:
        """Copy one run's values in. Host-side values travel through pinned memory without a sync."""
        steps = plan.steps
        if steps > self.max_steps:
            raise ValueError(f"plan has {steps} steps, buffers hold {self.max_steps}")
        self.x.copy_(x)
        rows = torch.stack([getattr(plan, name) for name in SCHEDULE_ROWS])
        self.schedule[:, :steps].copy_(_pinned(rows, self.x.device), non_blocking=True)
        for j, value in enumerate((cfg, rho, 1.0 - rho)):  # fill_ passes the scalar to a kernel: no sync
            self.cfg_rho[j].fill_(value)
        leaves, spec = tree_flatten(dict(inputs))
        if spec != self._spec:
            raise ValueError("conditioning structure differs from the captured one")
        for dst, src in zip(self._leaves, leaves):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        self.rewind()

    def load_noise(self, steps: int, generator: torch.Generator | None) -> None:
        """Draw every step's noise now, in the eager sampler's order (one draw of x's shape per step) and on the
        generator's device, as `draw_noise` does; a CPU generator's noise reaches the GPU in one pinned copy."""
        if self.noise is None:
            return
        if generator is None or generator.device.type == self.x.device.type:
            for i in range(steps):
                self.noise[i].copy_(draw_noise(self.x, generator))
            return
        host = torch.stack([
            torch.randn(self.x.shape, generator=generator, device=generator.device, dtype=torch.float32)
            for _ in range(steps)
        ])
        self.noise[:steps].copy_(_pinned(host, self.x.device), non_blocking=True)

    def rewind(self) -> None:
        self.step_index.zero_()

    # -------------------------------------------------------------- device side: one step, in place
    def step(self) -> None:
        """`sampling.sampler_step` over the static buffers, the schedule row picked by the device step counter."""
        i = self.step_index
        c = StepCoeffs(*self.schedule.index_select(1, i).view(-1).unbind(0))
        cfg, rho, one_minus_rho = self.cfg_rho.unbind(0)
        noise = self.noise.index_select(0, i).squeeze(0) if self.noise is not None else None
        x_next, x0 = sampler_step(self.denoise, self.x, c, self.inputs, cfg=cfg if self.key.guided else None,
                                  rho=rho, one_minus_rho=one_minus_rho, noise=noise)
        self.x.copy_(x_next)
        self.x0.copy_(x0)
        self.step_index.add_(1)

    def run(self, calls: int) -> None:
        for _ in range(calls):
            self.step()

    def addresses(self) -> dict[str, int]:
        out = {"x": self.x.data_ptr(), "x0": self.x0.data_ptr(), "schedule": self.schedule.data_ptr(),
               "step_index": self.step_index.data_ptr(), "cfg_rho": self.cfg_rho.data_ptr()}
        if self.noise is not None:
            out["noise"] = self.noise.data_ptr()
        for j, t in enumerate(self._leaves):
            if isinstance(t, Tensor):
                out[f"inputs[{j}]"] = t.data_ptr()
        return out


def _pinned(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor bound for a CUDA device goes through pinned memory (an async copy, no stream sync)."""
    return t.pin_memory() if t.device.type == "cpu" and device.type == "cuda" else t


def input_signature(inputs: Mapping[str, Any]) -> tuple:
    leaves, spec = tree_flatten(dict(inputs))
    return (str(spec), tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else t for t in leaves))


def weights_fingerprint(tensors: Iterable[Tensor]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


@dataclass
class _Entry:
    static: StaticStep
    graph: Any = None  # torch.cuda.CUDAGraph in graph mode
    addresses: dict[str, int] = field(default_factory=dict)


class GraphedSampler:
    """`run_plan` with the whole step captured per `GraphKey` (mode="graph") or run from static buffers ("static").

    stage: a name for keys and logs. weights: the tensors the captured kernels read (the stage module's
    parameters and buffers), checked per call: if they moved, the graphs are dropped and captured again.
    pool: a `torch.cuda.graph_pool_handle()` shared with other samplers that never replay concurrently.
    """

    def __init__(
        self,
        stage: str,
        *,
        mode: str = "graph",
        weights: Callable[[], Iterable[Tensor]] | None = None,
        pool: Any = None,
        warmup_runs: int = 2,
        whole_loop: bool = False,
        capture_new: bool = True,
        debug: bool = False,
        max_steps: int = 64,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown graph mode {mode!r}; use one of {MODES}")
        if warmup_runs < 2 and mode == "graph":
            raise ConfigError("CUDA-graph capture needs at least 2 warm-up runs (autotuning, lazy init)")
        self.stage, self.mode, self.pool, self.warmup_runs = stage, mode, pool, warmup_runs
        self.whole_loop, self.capture_new, self.debug, self.max_steps = whole_loop, capture_new, debug, max_steps
        self._weights = weights
        self._fingerprint: tuple[int, ...] | None = None
        self.entries: dict[GraphKey, _Entry] = {}
        self._warned: set[Any] = set()
        self._failed: set[GraphKey] = set()  # keys whose capture failed: eager from then on
        self.stats = {"replays": 0, "captures": 0, "fallbacks": 0, "invalidations": 0}

    def freeze(self) -> None:
        """No more captures: from now on an unknown key runs eagerly (one warning per key)."""
        self.capture_new = False

    def use_pool(self, pool: Any) -> None:
        """Capture into `pool` from now on (graphs of another pool are dropped and captured again)."""
        if pool is not self.pool:
            self.pool = pool
            self.entries.clear()

    def reset(self) -> None:
        self.entries.clear()
        self._failed.clear()
        self._fingerprint = None

    def sample_stage(self, *args: Any, **kwargs: Any) -> Tensor:
        """Drop-in for `sampling.sample_stage` (same arguments, same result, same noise): that function with this
        sampler as its loop. The plan is built on the host and reaches the static schedule in one pinned copy."""
        return sample_stage(*args, **kwargs, run=self, plan_on_host=True)

    def _warn_once(self, token: Any, message: str, *args: Any) -> None:
        if token not in self._warned:
            self._warned.add(token)
            logger.warning(message, *args)

    # -------------------------------------------------------------- the sampler call
    def __call__(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        plan: StagePlan,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None = None,
        *,
        cfg: float | None = None,
        cfg_rho: float = 0.7,
        generator: torch.Generator | None = None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        eager = dict(cfg=cfg, cfg_rho=cfg_rho, generator=generator, callback=callback)
        if self.mode == "graph" and x.device.type != "cuda":
            self._warn_once("device", "stage %s: CUDA graphs need a CUDA device (x is on %s); running eagerly",
                            self.stage, x.device)
            return run_plan(model, x, plan.to(x.device), cond, uncond, **eager)
        use_cfg = cfg is not None and uncond is not None
        if plan.mode == "diffusers":  # the same rules as run_plan
            use_cfg, cfg_rho = use_cfg and cfg > 1, 0.0
        inputs = concat_conditioning(dict(cond), dict(uncond)) if use_cfg else dict(cond)
        key = self.key_for(x, plan, inputs, use_cfg, whole_loop=self.whole_loop and callback is None)
        self._check_weights()

        entry = self.entries.get(key)
        if entry is not None and (
            entry.static.signature != input_signature(inputs) or plan.steps > entry.static.max_steps
        ):
            self._warn_once(("mismatch", key), "stage %s: %s has other conditioning shapes or more steps than "
                            "captured; running eagerly", self.stage, key)
            self.stats["fallbacks"] += 1
            return run_plan(model, x, plan.to(x.device), cond, uncond, **eager)
        if entry is None:
            if not self.capture_new or key in self._failed:
                self._warn_once(key, "stage %s: no CUDA graph for %s (not captured); running eagerly", self.stage, key)
                self.stats["fallbacks"] += 1
                return run_plan(model, x, plan.to(x.device), cond, uncond, **eager)
            entry = self._capture(key, model, x, plan, inputs, use_cfg, cfg, cfg_rho)
            if entry is None:
                self.stats["fallbacks"] += 1
                return run_plan(model, x, plan.to(x.device), cond, uncond, **eager)

        static = entry.static
        static.load(x, plan, inputs, float(cfg) if use_cfg else 1.0, float(cfg_rho))
        static.load_noise(plan.steps, generator)
        if self.debug:
            self.check_addresses(entry)
        self._replay(entry, plan.steps, callback)
        return (static.x0 if plan.output == "x0" else static.x).clone()

    def key_for(
        self, x: Tensor, plan: StagePlan, inputs: Mapping[str, Any], guided: bool, whole_loop: bool
    ) -> GraphKey:
        tensors = [t for t in tree_flatten(dict(inputs))[0] if isinstance(t, Tensor) and t.is_floating_point()]
        dtype = tensors[0].dtype if tensors else x.dtype
        return GraphKey(
            self.stage, int(x.shape[0]), int(x.shape[-2]), int(x.shape[-1]), dtype,
            guided=guided, stochastic=plan.stochastic, loop_steps=plan.steps if whole_loop else 0,
        )

    # -------------------------------------------------------------- capture / replay
    def _capture(self, key, model, x, plan, inputs, use_cfg, cfg, cfg_rho) -> _Entry | None:
        max_steps = key.loop_steps or max(self.max_steps, plan.steps)
        static = StaticStep(key, model, inputs, int(x.shape[1]), max_steps, x.device)
        entry = _Entry(static)
        calls = key.loop_steps or 1
        if self.mode == "static":
            entry.addresses = static.addresses()
            self.entries[key] = entry
            return entry
        try:
            static.load(x, plan, inputs, float(cfg) if use_cfg else 1.0, float(cfg_rho))
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_runs):
                    static.rewind()
                    static.run(calls)
            torch.cuda.current_stream(x.device).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            static.rewind()
            # The outer stream context puts the caller's stream back even when capture fails: torch.cuda.graph's
            # __exit__ raises from capture_end (an invalidated capture) before it restores the stream it set.
            with torch.cuda.stream(side), torch.cuda.graph(graph, pool=self.pool, stream=side):
                static.run(calls)
        except Exception as exc:  # a backend that is not capturable: keep working, eagerly, and say so once
            self._failed.add(key)
            self._warn_once(key, "stage %s: CUDA-graph capture failed for %s (%s: %s); running eagerly",
                            self.stage, key, type(exc).__name__, exc)
            return None
        entry.graph, entry.addresses = graph, static.addresses()
        self.entries[key] = entry
        self.stats["captures"] += 1
        logger.info("stage %s: captured %s (%d step call(s) per graph)", self.stage, key, calls)
        return entry

    def _replay(self, entry: _Entry, steps: int, callback) -> None:
        static, loop = entry.static, entry.static.key.loop_steps
        if loop:
            entry.graph.replay() if entry.graph is not None else static.run(loop)
            self.stats["replays"] += 1
            return
        for i in range(steps):
            entry.graph.replay() if entry.graph is not None else static.step()
            self.stats["replays"] += 1
            if callback is not None:
                callback(i, static.x0, static.x)

    # -------------------------------------------------------------- safety checks
    def check_addresses(self, entry: _Entry) -> None:
        """Debug mode: the static buffers must sit where they were at capture (weights: `_check_weights`)."""
        now = entry.static.addresses()
        moved = [name for name, ptr in entry.addresses.items() if now.get(name) != ptr]
        if moved:
            raise EngineError(f"stage {self.stage}: CUDA-graph input buffers moved since capture: {moved}")

    def _check_weights(self) -> None:
        """Drop all graphs when the weights moved (memory modes, a reloaded model): they read old addresses.

        The model callable itself is not part of the identity (pipelines pass a fresh lambda per call); a
        different model has different weights.
        """
        fingerprint = weights_fingerprint(self._weights()) if self._weights is not None else None
        if self.entries and fingerprint != self._fingerprint:
            logger.info("stage %s: weights moved since capture; dropping %d graph(s)", self.stage, len(self.entries))
            self.entries.clear()
            self.stats["invalidations"] += 1
        self._fingerprint = fingerprint
