"""A real uvicorn server on a free loopback port, serving the tiny random-weights pipeline (CPU, fp32)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

FAST = {"steps_c": 2, "steps_b": 2}  # sampling settings the tests use: seconds per batch on a 2-core CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    app: Any
    server: Any
    thread: threading.Thread
    pipe: Any

    @property
    def service(self):
        return self.app.state.service

    def batches(self) -> int:
        return self.service.batcher.batches

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(pipe: Any, **config: Any) -> Running:
    import uvicorn

    from cascade_rt.serve.app import ServeConfig, create_app

    cfg = ServeConfig(**{"sizes": ((256, 256),), "warmup_steps": 1, "random_weights": True, **config})
    app = create_app(lambda: pipe, cfg)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Running(url, app, server, thread, pipe)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.should_exit = True
    raise RuntimeError("the test server did not become ready within 60 s")


@pytest.fixture(scope="session")
def tiny_pipe():
    from cascade_rt import load_pipeline

    return load_pipeline(random_weights=True, preset="tiny", seed=0, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def server(tiny_pipe):
    running = start_server(tiny_pipe, max_batch=4, max_wait_ms=300, max_queue=6)
    yield running
    running.stop()
