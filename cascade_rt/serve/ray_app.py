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
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable, Mapping
from typing import Any

from cascade_rt.serve.app import ServeConfig, create_app

logger = logging.getLogger(__name__)


def pipeline_loader(kwargs: Mapping[str, Any]) -> Callable[[], Any]:
    """`load_pipeline(**kwargs)` as a picklable callable; a dtype may be given by name ("bfloat16")."""
    kwargs = dict(kwargs)

    def load() -> Any:
        import torch

        from cascade_rt import load_pipeline

        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        return load_pipeline(**kwargs)

    return load


def build_app(pipeline: Mapping[str, Any] | Callable[[], Any], config: ServeConfig | None = None, *,
              num_replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
              autoscaling: Mapping[str, Any] | None = None, name: str = "CascadeRT"):  # fmt: skip
    """A Ray Serve application: `pipeline` is `load_pipeline` keyword arguments (or a loader callable)."""
    from ray import serve

    # Ray routes to a replica once its constructor (the app start-up) returns: load before that
    config = dataclasses.replace(config or ServeConfig(), load_in_background=False)
    load = pipeline if callable(pipeline) else pipeline_loader(pipeline)

    def make_app():
        return create_app(load, config)

    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "max_ongoing_requests": config.max_queue + config.max_batch,  # the replica's own queue decides (429)
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
    import os
    import threading

    import ray
    import torch
    from ray import serve

    from cascade_rt.commands.generate import load_from_args

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else 0.0
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(lambda: load_from_args(args), config, num_replicas=args.replicas, gpus_per_replica=gpus,
                    cpus_per_replica=args.cpus_per_replica)  # fmt: skip
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
