"""Closed-loop load against a running server: `concurrency` clients, each sending its next request when the last
one is answered, until `requests` have been sent. Latency is end-to-end (request sent -> body received)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import numpy as np
import uvicorn

from cascade_rt.serve.app import create_app


async def _load(url: str, body: dict[str, Any], concurrency: int, requests: int, timeout: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    images = 0
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent, images
        while sent < requests:
            sent += 1
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/images/generations", json={**body, "seed": sent})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                images += len(r.json()["data"])

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "concurrency": concurrency, "requests": requests, "ok": len(latencies), "statuses": statuses,
        "wall_s": wall, "images_per_s": images / wall, "requests_per_s": len(latencies) / wall,
        "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)), "mean_s": float(lat.mean()),
    }


def run_load(url: str, body: dict[str, Any], *, concurrency: int, requests: int, timeout: float = 600) -> dict:
    """Throughput and latency percentiles of `requests` requests sent by `concurrency` closed-loop clients."""
    return asyncio.run(_load(url, body, concurrency, requests, timeout))


class LocalServer:
    """`create_app(...)` served by uvicorn on a thread of this process, on a free loopback port (benchmarks, tests).

    with LocalServer(lambda: pipe, ServeConfig(...)) as server:
        server.url, server.service.batcher.batches
    """

    def __init__(self, load: Any, config: Any, *, ready_timeout: float = 600) -> None:
        self.load, self.config, self.ready_timeout = load, config, ready_timeout

    def __enter__(self) -> LocalServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.app = create_app(self.load, self.config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="cascade-rt-uvicorn")
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + self.ready_timeout
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
                health = httpx.get(f"{self.url}/healthz", timeout=2)
                if health.status_code == 500:  # loading failed: say why now, not after the timeout
                    self.__exit__()
                    raise RuntimeError(f"the local server failed to start: {health.json()['reason']}")
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                break
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"the local server did not become ready within {self.ready_timeout:.0f} s")

    @property
    def service(self) -> Any:
        return self.app.state.service

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
