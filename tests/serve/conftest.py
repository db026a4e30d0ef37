"""A real uvicorn server on a free loopback port, serving the tiny random-weights pipeline (CPU, fp32)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch

FAST = {"steps_c": 2, "steps_b": 2}  # sampling settings the tests use: seconds per batch on a 2-core CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A `LocalServer` (a real uvicorn server on a loopback port) plus the pipeline it serves."""

    def __init__(self, local, pipe) -> None:
        self.local, self.pipe, self.url = local, pipe, local.url

    @property
    def service(self):
        return self.local.service

    def batches(self) -> int:
        return self.service.batcher.batches

    def stop(self) -> None:
        self.local.__exit__()


def start_server(pipe: Any, **config: Any) -> Running:
    from cascade_rt.serve.app import ServeConfig
    from cascade_rt.serve.loadgen import LocalServer

    cfg = ServeConfig(**{"sizes": ((256, 256),), "warmup_steps": 1, "random_weights": True, **config})
    return Running(LocalServer(lambda: pipe, cfg, ready_timeout=60).__enter__(), pipe)


@pytest.fixture(scope="session")
def tiny_pipe():
    from cascade_rt import load_pipeline

    return load_pipeline(random_weights=True, preset="tiny", seed=0, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def server(tiny_pipe):
    running = start_server(tiny_pipe, max_batch=4, max_wait_ms=300, max_queue=6)
    yield running
    running.stop()
