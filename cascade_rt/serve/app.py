"""The HTTP application: an OpenAI-compatible images API on FastAPI (docs/serving.md).

    app = create_app(lambda: cascade_rt.load_pipeline(random_weights=True, preset="tiny"), ServeConfig())

Endpoints: `POST /v1/images/generations` (OpenAI JSON; `stream: true` sends server-sent events: the Stage C
previewer image, then the final image), `POST /v1/images/edits` (image-to-image, multipart upload),
`POST /v1/images/variations` (CLIP image variation, multipart), `POST /v1/generate` (native: one PNG with the
generation metadata in it), `GET /v1/models`, `GET /healthz`, `GET /readyz`, `GET /metrics`.

With a ControlNet loaded (`serve --controlnet`), the edits endpoint's `image` is the control image and its `mask`
the inpainting mask (a `control_image` file beside `image` makes `image` the image-to-image source again);
`/v1/generate` takes base64 `control_image` and `mask`; both take `control_strength` (docs/serving.md).

The pipeline loads (and warms up) in the background after start: `/healthz` answers at once, `/readyz` and the
generation endpoints answer 503 until the model is ready. Errors use the OpenAI error body
`{"error": {"message", "type", "param", "code"}}` with the statuses of docs/serving.md.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image

from cascade_rt.errors import CascadeError, ConfigError, NumericsError
from cascade_rt.serve.batcher import Batcher, DeadlineExceeded, Job, QueueFull, ShuttingDown
from cascade_rt.serve.engine import BatchEngine
from cascade_rt.serve.metrics import ServeMetrics
from cascade_rt.serve.responses import ClientGone, Refusal, ServedBy, encode_png, error_response, read_body
from cascade_rt.serve.schemas import (
    ControlSupport,
    GenerationSpec,
    Limits,
    RequestError,
    decode_image,
    form_to_body,
    load_json,
    parse_generation,
    parse_multipart,
)

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)  # (height, width) served; the first is the default
    max_batch: int = 4  # images per model batch (a request's n counts whole)
    max_wait_ms: float = 20.0  # how long the oldest request waits for others to share its batch
    max_queue: int = 64  # requests waiting; past it: 429
    request_timeout_s: float = 300.0  # deadline per request (a client may ask for less: X-Request-Timeout)
    warmup_steps: int = 2  # steps per stage of the warm-up generations (0: no warm-up)
    overlap: bool = True  # Stage C of the next batch during Stage B/A of this one (CUDA, resident memory)
    model_name: str = "stable-cascade"
    random_weights: bool = False
    seed: int | None = None  # requests without a seed get seed, seed + 1, ... (None: random seeds)
    load_in_background: bool = True  # False: start-up returns once ready (Ray Serve replicas: ready = constructed)

    @property
    def limits(self) -> Limits:
        return Limits(tuple(self.sizes), self.max_batch)


class Service:
    """What the routes share: the pipeline's state, the batcher and the metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config, self.metrics = config, ServeMetrics(config.max_batch)
        self.batcher: Batcher | None = None
        self.engine: BatchEngine | None = None
        self.ready, self.failure = False, None
        self.info: dict[str, Any] = {}
        self.control = ControlSupport()  # the loaded ControlNet, once loaded: requests are checked against it
        self._seeds = itertools.count(config.seed) if config.seed is not None else None

    def next_seed(self) -> int | None:
        return next(self._seeds) if self._seeds is not None else None

    async def load(self, load: Callable[[], Any], make_engine: Callable[[Any], Any] | None = None) -> None:
        """`load()` returns a pipeline, run through a `BatchEngine` (or `make_engine(loaded)`: an object with
        `prior`, `decoder`, `warmup` and `overlap`, as the Ray Serve split deployments use)."""
        try:
            t0 = time.perf_counter()
            loaded = await asyncio.to_thread(load)
            if make_engine is not None:
                self.engine = make_engine(loaded)
            else:
                self.engine = BatchEngine(loaded, overlap=self.config.overlap)
            self.info["load_s"] = round(time.perf_counter() - t0, 2)
            self.control = await asyncio.to_thread(lambda: getattr(self.engine, "control_support", ControlSupport()))
            if self.control.kind is not None:
                self.info["controlnet"] = self.control.kind
            if self.config.warmup_steps > 0:
                warm = await asyncio.to_thread(self.engine.warmup, self.config.sizes, self.config.max_batch,
                                               self.config.warmup_steps)
                self.info["warmup_s"] = round(warm, 2)
            self.batcher = Batcher(self.engine, max_batch=self.config.max_batch,
                                   max_wait=self.config.max_wait_ms / 1000, max_queue=self.config.max_queue,
                                   metrics=self.metrics)
            self.batcher.start()
            self.ready = True
            self.metrics.ready.set(1)
            logger.info("ready: %s (overlap %s)", self.info, self.engine.overlap)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and /healthz
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("loading the model failed: %s", self.failure)

    async def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.stop()


def create_app(load: Callable[[], Any], config: ServeConfig | None = None, *,
               make_engine: Callable[[Any], Any] | None = None) -> FastAPI:
    """The FastAPI application; `load()` returns the pipeline (it runs on a thread after start)."""
    config = config or ServeConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = app.state.service = Service(config)
        loading = asyncio.create_task(service.load(load, make_engine))
        if not config.load_in_background:
            await loading
            if service.failure:
                raise RuntimeError(f"loading the model failed: {service.failure}")
        yield
        await loading
        await service.shutdown()

    app = FastAPI(title="cascade-rt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(ServedBy)

    def service_of(request: Request) -> Service:
        return request.app.state.service

    def seeds(request: Request) -> Callable[[], int] | None:
        s = service_of(request)
        return s.next_seed if s._seeds is not None else None

    # ---------------------------------------------------------------------------------------- health, metrics
    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        s = service_of(request)
        if s.failure:
            return JSONResponse({"status": "failed", "reason": s.failure}, status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        s = service_of(request)
        if not s.ready:
            reason = s.failure or "loading weights and warming up"
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        sizes = [f"{w}x{h}" for h, w in config.sizes]
        return JSONResponse({"status": "ready", "sizes": sizes, "max_batch": config.max_batch, **s.info})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        m = service_of(request).metrics
        return Response(m.render(), media_type=m.content_type)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": config.model_name, "object": "model",
                                                          "owned_by": "cascade-rt", "created": 0}]})

    # ---------------------------------------------------------------------------------------- generation
    async def admit(request: Request, endpoint: str, parse: Callable[[], Any]) -> tuple[Job, float] | Response:
        """Parse and check the request, then queue it: the job, or the error response (recorded in metrics)."""
        s = service_of(request)
        t0 = time.perf_counter()
        try:
            if not s.ready:
                reason = s.failure or "the model is loading (weights, warm-up)"
                raise Refusal(503, f"not ready: {reason}; retry when GET /readyz answers 200", "unavailable",
                               {"Retry-After": "5"})
            spec = await parse()
            timeout = config.request_timeout_s
            asked = request.headers.get("x-request-timeout")
            if asked is not None:
                try:
                    timeout = min(timeout, float(asked))
                except ValueError:
                    raise RequestError(400, f"X-Request-Timeout {asked!r} is not a number of seconds") from None
            job = s.batcher.submit(spec, timeout=timeout)
            return job, t0
        except RequestError as exc:
            s.metrics.observe_request(endpoint, exc.status, None)
            return error_response(exc.status, exc.message, "invalid_request_error", exc.param)
        except QueueFull as exc:
            s.metrics.observe_request(endpoint, 429, None)
            return error_response(429, str(exc), "server_overloaded", headers={"Retry-After": str(exc.retry_after)})
        except ShuttingDown as exc:
            s.metrics.observe_request(endpoint, 503, None)
            return error_response(503, str(exc), "unavailable", headers={"Retry-After": "1"})
        except Refusal as exc:
            s.metrics.observe_request(endpoint, exc.status, None)
            return error_response(exc.status, exc.message, exc.kind, headers=exc.headers)

    async def outcome(request: Request, job: Job) -> list[Image.Image]:
        """The job's images; raises its batch's error, DeadlineExceeded, or ClientGone."""
        async def disconnected() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)

        watch = asyncio.create_task(disconnected())
        try:
            remaining = max(0.0, job.deadline - time.monotonic())
            done, _ = await asyncio.wait({job.future, watch}, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.future in done:
                return job.future.result()
            service_of(request).batcher.cancel(job)
            if watch in done:
                raise ClientGone()
            raise DeadlineExceeded(f"no result within the request's deadline ({remaining:.1f} s left when it "
                                   "was queued); the work was dropped if it had not started")
        finally:
            watch.cancel()

    def failure_response(exc: BaseException) -> Response:
        if isinstance(exc, DeadlineExceeded):
            return error_response(504, str(exc), "timeout")
        if isinstance(exc, NumericsError):
            return error_response(500, f"the batch failed: {exc}", "numerics_error")
        if isinstance(exc, ConfigError):
            return error_response(400, str(exc), "invalid_request_error")
        if isinstance(exc, CascadeError):
            return error_response(500, str(exc), "server_error")
        logger.exception("a batch failed", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    async def respond(request: Request, endpoint: str, parse: Callable[[], Any],
                      render: Callable[[GenerationSpec, list[Image.Image]], Response]) -> Response:
        s = service_of(request)
        admitted = await admit(request, endpoint, parse)
        if isinstance(admitted, Response):
            return admitted
        job, t0 = admitted
        if job.spec.stream:
            return stream(request, endpoint, job, t0)
        try:
            images = await outcome(request, job)
        except ClientGone:
            s.metrics.observe_request(endpoint, 499, None)
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - one answer per accepted request
            response = failure_response(exc)
            s.metrics.observe_request(endpoint, response.status_code, None)
            return response
        response = render(job.spec, images)
        s.metrics.observe_request(endpoint, response.status_code, time.perf_counter() - t0)
        return response

    def openai_body(spec: GenerationSpec, images: list[Image.Image]) -> Response:
        data = [{"b64_json": b64_png(spec, im, i), "revised_prompt": spec.prompt} for i, im in enumerate(images)]
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png", "seed": spec.seed})

    def b64_png(spec: GenerationSpec, image: Image.Image, index: int) -> str:
        meta = {**spec.meta, "index": index, "model": config.model_name}
        return base64.b64encode(encode_png(image, meta, config.random_weights)).decode()

    def stream(request: Request, endpoint: str, job: Job, t0: float) -> Response:
        """Server-sent events: `image_generation.partial_image` (the Stage C previewer image of each of the n
        images) as soon as Stage C is done, then `image_generation.completed` per image (docs/serving.md)."""
        s = service_of(request)
        previews: asyncio.Queue = asyncio.Queue()
        job.on_preview = previews.put_nowait

        def event(kind: str, payload: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

        async def events():
            status = 200
            try:
                waiter = asyncio.ensure_future(asyncio.shield(job.future))
                while True:
                    getter = asyncio.ensure_future(previews.get())
                    remaining = max(0.0, job.deadline - time.monotonic())
                    done, _ = await asyncio.wait({waiter, getter}, timeout=remaining,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        for i, im in enumerate(getter.result()):
                            yield event("image_generation.partial_image",
                                        {"b64_json": b64_png(job.spec, im, i), "index": i, "partial_image_index": 0,
                                         "stage": "c", "seed": job.spec.seed})
                        continue
                    getter.cancel()
                    if waiter not in done:
                        s.batcher.cancel(job)
                        raise DeadlineExceeded("no result within the request's deadline; the work was dropped "
                                               "if it had not started")
                    break
                while not previews.empty():  # a preview that arrived with the result
                    for i, im in enumerate(previews.get_nowait()):
                        yield event("image_generation.partial_image",
                                    {"b64_json": b64_png(job.spec, im, i), "index": i, "partial_image_index": 0,
                                     "stage": "c", "seed": job.spec.seed})
                for i, im in enumerate(job.future.result()):
                    yield event("image_generation.completed",
                                {"b64_json": b64_png(job.spec, im, i), "index": i, "seed": job.spec.seed,
                                 "output_format": "png"})
            except asyncio.CancelledError:  # the client went away
                s.batcher.cancel(job)
                status = 499
                raise
            except Exception as exc:  # noqa: BLE001
                response = failure_response(exc)
                status = response.status_code
                yield event("error", json.loads(response.body))
            finally:
                s.metrics.observe_request(endpoint, status, time.perf_counter() - t0 if status == 200 else None)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        async def parse() -> GenerationSpec:
            return parse_generation(load_json(await read_body(request)), config.limits, next_seed=seeds(request),
                                    control=service_of(request).control)

        return await respond(request, "generations", parse, openai_body)

    async def parse_upload(request: Request, mode: str) -> GenerationSpec:
        fields, files = parse_multipart(request.headers.get("content-type", ""), await read_body(request))
        allowed = ("image", "mask", "control_image") if mode == "image" else ("image",)
        extra = sorted(set(files) - set(allowed))
        if extra:
            raise RequestError(400, f"{', '.join(extra)}: not a file of this endpoint; it takes "
                                    f"{', '.join(repr(a) for a in allowed)}", extra[0])
        if "image" not in files:
            raise RequestError(400, "image: missing; upload the input image as the multipart file 'image'", "image")
        image = decode_image(files["image"])
        body = form_to_body(fields)
        if mode == "variation":
            body.setdefault("prompt", "")
            return parse_generation(body, config.limits, mode=mode, image=image, next_seed=seeds(request))
        control = service_of(request).control
        control_image = decode_image(files["control_image"], "control_image") if "control_image" in files else None
        mask = decode_image(files["mask"], "mask") if "mask" in files else None
        if control.kind is not None and control_image is None:  # with a ControlNet, the edit's image is the control
            if "strength" in body:
                raise RequestError(400, "strength: with a ControlNet loaded, image is the control image, and there is "
                                        "no image-to-image; upload the control image as 'control_image' to use image "
                                        "as the image-to-image source", "strength")
            image, control_image, mode = None, image, "text"
        return parse_generation(body, config.limits, mode=mode, image=image, control_image=control_image, mask=mask,
                                control=control, next_seed=seeds(request))

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        return await respond(request, "edits", lambda: parse_upload(request, "image"), openai_body)

    @app.post("/v1/images/variations")
    async def variations(request: Request) -> Response:
        return await respond(request, "variations", lambda: parse_upload(request, "variation"), openai_body)

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        async def parse() -> GenerationSpec:
            spec = parse_generation(load_json(await read_body(request)), config.limits, native=True,
                                    next_seed=seeds(request), control=service_of(request).control)
            if spec.n != 1 or spec.stream:
                raise RequestError(400, "/v1/generate returns one PNG: n must be 1 and stream false; use "
                                        "/v1/images/generations for more", "n")
            return spec

        def png(spec: GenerationSpec, images: list[Image.Image]) -> Response:
            data = encode_png(images[0], {**spec.meta, "model": config.model_name}, config.random_weights)
            return Response(data, media_type="image/png", headers={"X-Seed": str(spec.seed)})

        return await respond(request, "generate", parse, png)

    return app
