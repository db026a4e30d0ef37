"""Throughput: many prompts as batches; Stage B/A of batch k overlapped with Stage C of batch k+1.

`ThroughputRunner(pipe, max_batch=4)(prompts, seed=s)` groups the prompts, in order, into batches of at most
`max_batch`; batch k uses seed `s + k`, so its images do not depend on how the batches were scheduled: they
equal `pipe(batch_k, seed=s + k)` exactly.

Each batch is split into two phases that mirror the pipeline's text-to-image path:
`prior` (text encoder + Stage C) and `decoder` (Stage B + Stage A), continuing with the same generator.
On a CUDA device, in the resident memory mode, the prior phases run in a worker thread on their own stream and
the decoder phases on another; an event hands each Stage C latent over. Host syncs inside a phase (a stream sync
for a small host->device copy, the finiteness check) block only that phase's thread, so the device works on
both streams at once. Graphs replayed concurrently must not share a memory pool: Stage B's sampler gets its own
pool (and recaptures once). Every batch size is captured before overlapping starts (its first batch runs
alone), and the samplers are frozen during the overlap, so no capture happens while another stream runs.
Elsewhere (CPU, sequential/offload memory, one batch) the phases run one after the other: same results.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cascade_rt.errors import ConfigError
from cascade_rt.pipeline import CascadeOutput, PromptEmbeds, StableCascadePipeline, WallTimer, to_pil
from cascade_rt.stages import SAMPLING, check_resolution, default_size, latent_shapes

logger = logging.getLogger(__name__)


def make_batches(prompts: Sequence[str], max_batch: int) -> list[list[str]]:
    """Consecutive groups of at most `max_batch` prompts (order kept)."""
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    prompts = list(prompts)
    return [prompts[i : i + max_batch] for i in range(0, len(prompts), max_batch)]


@dataclass
class Settings:
    height: int = default_size("full")
    width: int = default_size("full")
    steps_c: int = SAMPLING["c"].steps
    cfg_c: float | None = SAMPLING["c"].cfg
    shift_c: float = SAMPLING["c"].shift
    steps_b: int = SAMPLING["b"].steps
    cfg_b: float | None = SAMPLING["b"].cfg
    shift_b: float = SAMPLING["b"].shift


@dataclass
class Prior:
    prompts: list[str]
    seed: int
    gen: torch.Generator
    latent_c: Tensor
    embeds: PromptEmbeds
    timings: dict[str, float] = field(default_factory=dict)


@torch.inference_mode()
def prior(pipe: StableCascadePipeline, prompts: list[str], negatives: list[str], seed: int, s: Settings) -> Prior:
    """The pipeline's text and Stage C phases, with the pipeline's generator order (text-to-image)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    timings: dict[str, float] = {}
    timer = WallTimer(timings, pipe.synchronize)
    embeds = pipe.encode(prompts, negatives, timer=timer)
    x_c = pipe.initial_latent(None, latent_shapes(len(prompts), s.height, s.width)["c"], gen, "latents_c")
    latent_c = pipe.prior(embeds, x_c, steps=s.steps_c, cfg=s.cfg_c, shift=s.shift_c, gen=gen, timer=timer)
    return Prior(prompts, seed, gen, latent_c, embeds, timings)


@torch.inference_mode()
def decoder(pipe: StableCascadePipeline, p: Prior, s: Settings) -> CascadeOutput:
    """The pipeline's Stage B + A phase for a prior's output, continuing its generator (as the pipeline does)."""
    timings = dict(p.timings)
    x_b = pipe.initial_latent(None, latent_shapes(len(p.prompts), s.height, s.width)["b"], p.gen, "latents_b")
    pixels, latent_b = pipe.decoder(p.latent_c, p.embeds.pooled, p.embeds.u_pooled, x_b, steps=s.steps_b,
                                    cfg=s.cfg_b, shift=s.shift_b, gen=p.gen, timer=WallTimer(timings, pipe.synchronize))
    return CascadeOutput(to_pil(pixels), pixels, p.latent_c, latent_b, p.seed, None, timings)


class ThroughputRunner:
    """Batched text-to-image over a pipeline, overlapping stages across batches on CUDA (module docstring)."""

    def __init__(self, pipe: StableCascadePipeline, *, max_batch: int = 4, overlap: bool = True) -> None:
        self.pipe, self.max_batch = pipe, max_batch
        memory = getattr(pipe, "memory", None)
        self.overlap = overlap and pipe.device.type == "cuda" and (memory is None or not memory.moves_weights)
        self.last: dict[str, Any] = {}
        graphed = getattr(pipe, "graphed", {})
        if self.overlap and "b" in graphed and "c" in graphed and graphed["b"].pool is graphed["c"].pool:
            graphed["b"].use_pool(torch.cuda.graph_pool_handle())  # C and B replay concurrently

    def __call__(
        self, prompts: Sequence[str], negative_prompt: str = "", *, seed: int = 0, **settings: Any
    ) -> list[CascadeOutput]:
        s = Settings(**settings)
        check_resolution(s.height, s.width)
        batches = make_batches(prompts, self.max_batch)
        jobs = [(k, b, [negative_prompt] * len(b), seed + k) for k, b in enumerate(batches)]
        t0 = time.perf_counter()
        if self.overlap and len(jobs) > 1:
            outputs = self._overlapped(jobs, s)
        else:
            outputs = [decoder(self.pipe, prior(self.pipe, b, n, sd, s), s) for _, b, n, sd in jobs]
        wall = time.perf_counter() - t0
        images = sum(len(b) for b in batches)
        self.last = {"batches": len(batches), "images": images, "wall_s": wall, "images_per_s": images / wall,
                     "overlap": self.overlap and len(jobs) > 1}
        return outputs

    def _overlapped(self, jobs: list, s: Settings) -> list[CascadeOutput]:
        pipe, outputs = self.pipe, {}
        first_of_size: dict[int, int] = {}
        for k, b, _, _ in jobs:
            first_of_size.setdefault(len(b), k)
        alone = sorted(first_of_size.values(), key=lambda k: -len(jobs[k][1]))  # largest first: shared pools
        for k in alone:  # captures every batch size's graphs before any overlap
            _, b, n, sd = jobs[k]
            outputs[k] = decoder(pipe, prior(pipe, b, n, sd, s), s)
        rest = [j for j in jobs if j[0] not in outputs]
        graphed = getattr(pipe, "graphed", {})
        frozen = {name: g.capture_new for name, g in graphed.items()}
        for g in graphed.values():
            g.freeze()
        s_c, s_ba = torch.cuda.Stream(pipe.device), torch.cuda.Stream(pipe.device)
        handoff: queue.Queue = queue.Queue(maxsize=1)  # at most one Stage C latent waiting: bounded memory
        failure: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            try:
                with torch.cuda.stream(s_c):
                    for k, b, n, sd in rest:
                        if stop.is_set():
                            break
                        p = prior(pipe, b, n, sd, s)
                        ready = torch.cuda.Event()
                        ready.record(s_c)
                        handoff.put((k, p, ready))
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)
            finally:
                handoff.put(None)

        thread = threading.Thread(target=worker, name="cascade-rt-prior", daemon=True)
        thread.start()
        try:
            with torch.cuda.stream(s_ba):
                while (item := handoff.get()) is not None:
                    k, p, ready = item
                    s_ba.wait_event(ready)
                    for t in (p.latent_c, p.embeds.pooled, p.embeds.u_pooled):
                        t.record_stream(s_ba)
                    outputs[k] = decoder(pipe, p, s)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting to hand over (if the consumer failed)
                try:
                    handoff.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()
            for name, g in graphed.items():
                g.capture_new = frozen[name]
        if failure:
            raise failure[0]
        return [outputs[k] for k in sorted(outputs)]
