"""The same application as a Ray Serve deployment: replicas across GPUs and machines (docs/serving.md, "Ray Serve").

    from ray import serve
    from cascade_rt.serve.app import ServeConfig
    from cascade_rt.serve.ray_app import build_app

    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(build_app({"weights": "weights/", "preset": "lite"}, ServeConfig(sizes=((1024, 1024),)),
                        num_replicas=4, gpus_per_replica=1), name="cascade", route_prefix="/")

Each replica runs `create_app` (the FastAPI application of `cascade-rt serve`, with its own dynamic batcher and
admission control) through `serve.ingress`. Ray does the rest: placing replicas on GPUs and nodes, routing
requests between them, replacing a replica that dies, autoscaling (`autoscaling={"min_replicas": 1,
"max_replicas": 8}`). A replica is constructed (and receives traffic) only once its model is loaded and warm.

`build_split_app` places the two phases of a batch in separate deployments (Stage C, i.e. text encoder + Stage C
+ previewer, and Stage B+A, e.g. on separate GPUs), composed in one request path: the ingress replicas batch and
admit as above and call the Stage C deployment, then the Stage B+A deployment, through Ray deployment handles; the
next batch's Stage C runs while the current batch's Stage B+A does. The per-request generators travel with the
Stage C result, so the images equal the single-deployment ones. ControlNet inputs (control image, mask, strength)
travel in the requests to the Stage C deployment, which computes the projections; the ingress checks requests
against the ControlNet the Stage C deployment loaded (`RemoteEngine.control_support`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import ray
import torch
from ray import serve

from cascade_rt.commands.generate import load_from_args
from cascade_rt.runtime.api import load_pipeline
from cascade_rt.serve.app import ServeConfig, create_app
from cascade_rt.serve.engine import BatchEngine

logger = logging.getLogger(__name__)


def pipeline_loader(kwargs: Mapping[str, Any]) -> Callable[[], Any]:
    """`load_pipeline(**kwargs)` as a picklable callable; a dtype may be given by name ("bfloat16")."""
    kwargs = dict(kwargs)

    def load() -> Any:
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        return load_pipeline(**kwargs)

    return load


def build_app(pipeline: Mapping[str, Any] | Callable[[], Any], config: ServeConfig | None = None, *,
              num_replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
              autoscaling: Mapping[str, Any] | None = None, name: str = "CascadeRT"):
    """A Ray Serve application: `pipeline` is `load_pipeline` keyword arguments (or a loader callable)."""
    # Ray routes to a replica once its constructor (the app start-up) returns: load before that
    config = dataclasses.replace(config or ServeConfig(), load_in_background=False)
    load = pipeline if callable(pipeline) else pipeline_loader(pipeline)

    def make_app():
        return create_app(load, config)

    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "max_ongoing_requests": config.max_queue + config.max_batch,  # the replica's own queue decides (429)
        "max_queued_requests": config.max_queue,  # past that, Ray answers 503 at once instead of queueing more
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if autoscaling:
        options["autoscaling_config"] = {"target_ongoing_requests": config.max_batch, **autoscaling}
    else:
        options["num_replicas"] = num_replicas

    @serve.deployment(**options)
    @serve.ingress(make_app)
    class CascadeRT:
        def check_health(self) -> None:
            service = self.app.state.service
            if service.failure:
                raise RuntimeError(service.failure)

    return CascadeRT.bind()


def run_ray(args: Any, config: ServeConfig) -> int:
    """`cascade-rt serve --ray`: join the cluster in RAY_ADDRESS (or start a local one), serve until SIGTERM."""
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else 0.0
    serve.start(http_options={"host": args.host, "port": args.port})
    if getattr(args, "split_stages", False):
        app = build_split_app(lambda: load_from_args(args), config, prior_replicas=args.replicas,
                              decoder_replicas=args.replicas, gpus_per_stage=gpus,
                              cpus_per_replica=args.cpus_per_replica)
    else:
        autoscaling = None
        if args.max_replicas is not None and args.max_replicas > args.replicas:
            autoscaling = {"min_replicas": args.replicas, "max_replicas": args.max_replicas}
        app = build_app(lambda: load_from_args(args), config, num_replicas=args.replicas, gpus_per_replica=gpus,
                        cpus_per_replica=args.cpus_per_replica, autoscaling=autoscaling)
    serve.run(app, name="cascade-rt", route_prefix="/")
    print(f"serving on http://{args.host}:{args.port} with {args.replicas} Ray Serve replica(s)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


# ------------------------------------------------------------------------------------------ split deployments
_INGRESS: dict[str, Any] = {}  # per replica process: the engine of a split ingress, set by its constructor


class RemoteEngine:
    """`BatchEngine`'s two phases on two deployments: `prior` on the Stage C one, `decoder` on the Stage B+A one."""

    overlap = True  # different replicas (different GPUs): the next prior runs while this decoder does

    def __init__(self, prior: Any, decoder: Any) -> None:
        self.prior_handle, self.decoder_handle = prior, decoder

    @property
    def control_support(self) -> Any:
        """The Stage C deployment's ControlNet (a blocking call: the ingress asks once, off its event loop)."""
        return self.prior_handle.control_support.remote().result()

    def warmup(self, sizes: Any, max_batch: int, steps: int = 2) -> float:
        return 0.0  # each stage deployment warmed itself before it took traffic

    def prior(self, specs: list, previews: Callable | None = None) -> Any:
        state, images = self.prior_handle.run.remote(specs, previews is not None).result()
        for i, ims in images.items():
            previews(i, ims)
        return state

    def decoder(self, state: Any) -> Any:
        return self.decoder_handle.run.remote(state).result()


PHASE_COMPONENTS = {"prior": {"text", "image", "effnet", "previewer", "c"}, "decoder": {"b", "a"}}


class StageWorker:
    """One phase of the batch on its own replica: the pipeline loaded and warmed, `run` called by the ingress."""

    def __init__(self, load: Callable[[], Any], config: ServeConfig, phase: str) -> None:
        self.engine, self.phase = BatchEngine(load(), overlap=False), phase
        if config.warmup_steps > 0:
            self.engine.warmup(config.sizes, config.max_batch, config.warmup_steps)
        pipe = self.engine.pipe
        memory = getattr(pipe, "memory", None)
        if memory is not None and pipe.device.type == "cuda" and memory.mode == "resident":
            # the other phase's weights leave this replica's GPU (warm-up needed them; serving does not)
            for name, module in memory.components.items():
                if name not in PHASE_COMPONENTS[phase]:
                    module.to("cpu")
            torch.cuda.empty_cache()

    def control_support(self) -> Any:
        return self.engine.control_support

    def run(self, *args: Any) -> Any:
        device = self.engine.pipe.device
        if self.phase == "prior":
            specs, want_previews = args
            images: dict[int, list] = {}
            state = self.engine.prior(specs, images.__setitem__ if want_previews else None)
            for name in ("latent_c", "pooled", "u_pooled"):  # to the host: Ray moves it to the other replica
                setattr(state, name, getattr(state, name).cpu())
            state.ready = None
            return state, images
        (state,) = args
        for name in ("latent_c", "pooled", "u_pooled"):
            setattr(state, name, getattr(state, name).to(device))
        state.gens.device = torch.device(device)
        return self.engine.decoder(state)


def build_split_app(pipeline: Mapping[str, Any] | Callable[[], Any], config: ServeConfig | None = None, *,
                    ingress_replicas: int = 1, prior_replicas: int = 1, decoder_replicas: int = 1,
                    gpus_per_stage: float = 0.0, cpus_per_replica: float = 1.0, name: str = "CascadeRT"):
    """Ingress + a Stage C deployment + a Stage B+A deployment. Each stage replica loads and warms the whole
    pipeline, then (on CUDA, resident memory) moves the other phase's weights to host memory."""
    config = dataclasses.replace(config or ServeConfig(), load_in_background=False)
    load = pipeline if callable(pipeline) else pipeline_loader(pipeline)
    actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_stage}
    stage = serve.deployment(StageWorker, ray_actor_options=actor, max_ongoing_requests=2)
    prior = stage.options(name=f"{name}StageC", num_replicas=prior_replicas).bind(load, config, "prior")
    decoder = stage.options(name=f"{name}StageBA", num_replicas=decoder_replicas).bind(load, config, "decoder")
    ingress_config = dataclasses.replace(config, warmup_steps=0)

    def make_app():
        return create_app(lambda: _INGRESS["engine"], ingress_config, make_engine=lambda engine: engine)

    @serve.deployment(name=name, num_replicas=ingress_replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=config.max_queue + config.max_batch)
    @serve.ingress(make_app)
    class CascadeRTSplit:
        def __init__(self, prior: Any, decoder: Any) -> None:
            _INGRESS["engine"] = RemoteEngine(prior, decoder)

    return CascadeRTSplit.bind(prior, decoder)
