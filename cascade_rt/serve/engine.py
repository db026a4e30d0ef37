"""One merged batch through the pipeline, each request with its own generator (docs/serving.md, "Batching").

A batch is a list of `GenerationSpec`s with one `BatchKey` (same shape and settings). The batch runs the
pipeline's own phases (`encode`, `prior`, `decoder`) on the concatenated rows, but every
draw of noise goes through `sampling.RowGenerators`: request i's rows come from `Generator().manual_seed(seed_i)`
in the pipeline's order (Stage C start noise, Stage C step noise, Stage B start noise, Stage B step noise). A
request therefore gets the images `pipe(prompt, negative, images_per_prompt=n, seed=seed, ...)` gives alone,
whatever it was batched with (up to the batch-size dependence of the kernels; tests/serve/test_batching.py).

ControlNet: each request with a control image gets its projections computed once, for its own rows
(`control_conditioning`, as `pipe(..., control_image=...)` does); the batch's `cnet` is their concatenation in row
order, with zero projections (which add nothing: those rows get exactly what they get without) for the rows of
requests without one. With a ControlNet loaded every batch carries `cnet`, even one without any control image,
so all batches of a shape have one input signature and replay the same CUDA graphs.

Two phases, as in `runtime/throughput.py`: `prior` (text encoder, Stage C and, for streamed requests, the
previewer) and `decoder` (Stage B, Stage A). On a CUDA device in the resident memory mode the server runs the prior
of the next batch on its own stream while the decoder of the current one runs on another (`overlap`); elsewhere
one after the other.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from cascade_rt.errors import ConfigError
from cascade_rt.extensions import control_conditioning
from cascade_rt.pipeline import WallTimer, from_pil, to_pil
from cascade_rt.sampling import RowGenerators, diffuse
from cascade_rt.serve.schemas import BatchKey, ControlInput, ControlSupport, GenerationSpec
from cascade_rt.stages import SAMPLING, latent_shapes

logger = logging.getLogger(__name__)
PreviewSink = Callable[[int, list[Image.Image]], None]  # (index of the request in the batch, its previews)


@dataclass
class PriorState:
    specs: list[GenerationSpec]
    key: BatchKey
    gens: RowGenerators
    latent_c: Tensor
    pooled: Tensor
    u_pooled: Tensor
    timings: dict[str, float] = field(default_factory=dict)
    ready: Any = None  # a CUDA event recorded after the prior, when overlapping


@dataclass
class BatchOutput:
    images: list[list[Image.Image]]  # per request, its n images
    timings: dict[str, float]  # seconds per stage, for the whole batch


class BatchEngine:
    """Runs merged batches on a pipeline (`StableCascadePipeline` or `RuntimePipeline`)."""

    def __init__(self, pipe: Any, *, overlap: bool = True) -> None:
        self.pipe = pipe
        memory = getattr(pipe, "memory", None)
        self.overlap = overlap and pipe.device.type == "cuda" and (memory is None or not memory.moves_weights)
        self.streams = None
        if self.overlap:
            self.streams = {"prior": torch.cuda.Stream(pipe.device), "decoder": torch.cuda.Stream(pipe.device)}
            graphed = getattr(pipe, "graphed", {})
            if "b" in graphed and "c" in graphed and graphed["b"].pool is graphed["c"].pool:
                graphed["b"].use_pool(torch.cuda.graph_pool_handle())  # C and B replay concurrently

    @property
    def control_support(self) -> ControlSupport:
        """The loaded ControlNet's kind (and saliency model), which requests are checked against before queueing."""
        ext = getattr(self.pipe, "extensions", None)
        if ext is None or ext.controlnet is None:
            return ControlSupport()
        return ControlSupport(ext.control, ext.saliency is not None)

    def warmup(self, sizes: Sequence[tuple[int, int]], max_batch: int, steps: int = 2) -> float:
        """Run every batch size 1..max_batch at every served size (largest first: graphs share one pool), then
        freeze the CUDA graphs, so no capture happens while serving. With a ControlNet, the warm-up requests send a
        grey control image (its filter runs, so a missing package fails the start, not a request). Returns the
        seconds it took."""
        t0 = time.perf_counter()
        shapes = sorted(((b, h, w) for h, w in sizes for b in range(1, max_batch + 1)),
                        key=lambda s: s[0] * s[1] * s[2], reverse=True)
        kind = self.control_support.kind
        for batch, height, width in shapes:
            key = BatchKey(height, width, steps, steps, SAMPLING["c"].cfg, SAMPLING["b"].cfg)  # the default CFG graphs
            control = None
            if kind is not None:
                keep_all = Image.new("L", (width, height), 0) if kind == "inpainting" else None
                control = ControlInput(Image.new("RGB", (width, height), (128, 128, 128)), keep_all)
            spec = GenerationSpec("warm-up", "", batch, 0, key, control=control)
            self.decoder(self.prior([spec]))
        if hasattr(self.pipe, "freeze_graphs"):
            self.pipe.freeze_graphs()
        return time.perf_counter() - t0

    @torch.inference_mode()
    def prior(self, specs: list[GenerationSpec], previews: PreviewSink | None = None) -> PriorState:
        """Text encoder + Stage C (+ the previewer for requests that stream) for one batch."""
        if self.streams is None:
            return self._prior(specs, previews)
        with torch.cuda.stream(self.streams["prior"]):
            state = self._prior(specs, previews)
            state.ready = torch.cuda.Event()
            state.ready.record(self.streams["prior"])
        return state

    @torch.inference_mode()
    def decoder(self, state: PriorState) -> BatchOutput:
        """Stage B + Stage A for a prior's output, continuing its generators."""
        if self.streams is None:
            return self._decoder(state)
        stream = self.streams["decoder"]
        with torch.cuda.stream(stream):
            stream.wait_event(state.ready)
            for t in (state.latent_c, state.pooled, state.u_pooled):
                t.record_stream(stream)
            return self._decoder(state)

    def _prior(self, specs: list[GenerationSpec], previews: PreviewSink | None) -> PriorState:
        pipe, key = self.pipe, specs[0].key
        rows = sum(s.n for s in specs)
        prompts = [s.prompt for s in specs for _ in range(s.n)]
        negatives = [s.negative_prompt for s in specs for _ in range(s.n)]
        gens = RowGenerators([(torch.Generator("cpu").manual_seed(s.seed), s.n) for s in specs], pipe.device)
        shapes = latent_shapes(rows, key.height, key.width)
        timings: dict[str, float] = {}
        timer = WallTimer(timings, pipe.synchronize)
        embeds = pipe.encode(prompts, negatives, timer=timer)
        if key.mode == "variation":  # each request's own image conditions its rows (the pipeline takes one image)
            if pipe.image_encoder is None:
                raise ConfigError("image variation needs an image encoder (CLIP ViT-L/14, an image_encoder/ folder "
                                  "beside the weights); this server's pipeline has none")
            with timer.section("clip_image"):
                clip_img = torch.cat([pipe._expand(pipe.image_encoder.encode(from_pil(s.image).to(pipe.device)), s.n)
                                      for s in specs])
            embeds = dataclasses.replace(embeds, clip_img=clip_img)
        steps, t_start = key.steps_c, 1.0
        if key.mode == "image":
            with timer.section("effnet"):
                effnet = torch.cat([pipe._expand(pipe._effnet_latent(from_pil(s.image), shapes["c"][-2:]), s.n)
                                    for s in specs])
            steps, t_start = int(key.steps_c * key.strength), key.strength
            x_c = diffuse(effnet, t_start, gens.randn(effnet.shape).to(pipe.device))
        else:
            x_c = gens.randn(shapes["c"]).to(pipe.device)
        control = self._control(specs, shapes["c"][-2:], timer)
        latent_c = pipe.prior(embeds, x_c, steps=steps, cfg=key.cfg_c, shift=SAMPLING["c"].shift, gen=gens,
                              t_start=t_start, timer=timer, control=control)
        wanted = [i for i, s in enumerate(specs) if s.stream]
        if wanted and previews is not None and pipe.previewer is not None:
            with timer.section("previewer"):
                images = to_pil(pipe.previewer(latent_c).float().clamp(0, 1))
            starts = _row_starts(specs)
            for i in wanted:
                previews(i, images[starts[i] : starts[i] + specs[i].n])
        return PriorState(list(specs), key, gens, latent_c, embeds.pooled, embeds.u_pooled, timings)

    def _control(self, specs: list[GenerationSpec], latent_hw: Sequence[int], timer: WallTimer) -> dict | None:
        """{'cnet': the official list (one entry per block index), each entry the projections of every row} for
        Stage C, or None without a ControlNet. Each request's projections are computed once for its n rows; the
        rows of requests without a control image get zeros."""
        ext = getattr(self.pipe, "extensions", None)
        if ext is None or ext.controlnet is None:
            return None
        with timer.section("controlnet"):
            parts = [self._zero_cnet(ext.controlnet, s.n, latent_hw) if s.control is None else control_conditioning(
                self.pipe, s.control.image, s.control.mask, s.control.strength, latent_hw, s.n)["cnet"]
                for s in specs]
            cnet = [None if entry is None else torch.cat([p[block] for p in parts])
                    for block, entry in enumerate(parts[0])]
        return {"cnet": cnet}

    def _zero_cnet(self, controlnet: Any, rows: int, latent_hw: Sequence[int]) -> list[Tensor | None]:
        """Zero projections for `rows` rows, laid out as `prepare_control` lays out real ones."""
        out: list[Tensor | None] = [None] * (max(controlnet.proj_blocks) + 1)
        for block in controlnet.proj_blocks:
            out[block] = torch.zeros((rows, controlnet.c_proj, *latent_hw), dtype=self.pipe.dtypes["c"],
                                     device=self.pipe.device)
        return out

    def _decoder(self, state: PriorState) -> BatchOutput:
        pipe, key = self.pipe, state.key
        shapes = latent_shapes(state.gens.rows, key.height, key.width)
        timings = dict(state.timings)
        x_b = state.gens.randn(shapes["b"]).to(pipe.device)
        pixels, _ = pipe.decoder(state.latent_c, state.pooled, state.u_pooled, x_b, steps=key.steps_b, cfg=key.cfg_b,
                                 shift=SAMPLING["b"].shift, gen=state.gens, timer=WallTimer(timings, pipe.synchronize))
        memory = getattr(pipe, "memory", None)
        if memory is not None:
            memory.finish()
        images = to_pil(pixels)
        starts = _row_starts(state.specs)
        return BatchOutput([images[starts[i] : starts[i] + s.n] for i, s in enumerate(state.specs)], timings)


def _row_starts(specs: Sequence[GenerationSpec]) -> list[int]:
    starts, row = [], 0
    for s in specs:
        starts.append(row)
        row += s.n
    return starts
