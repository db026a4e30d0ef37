"""`cascade-rt serve` as a process: health before readiness, no work before ready, graceful SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.serve.conftest import free_port


def test_serve_command_readiness_and_graceful_sigterm(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the server process writes it until the end
    t_start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade_rt.cli", "serve", "--random-weights", "--preset", "tiny", "--dtype", "fp32",
         "--port", str(port), "--warmup-steps", "0", "--max-batch", "1", "--seed", "7"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        seen_loading, end = False, time.monotonic() + 90
        while time.monotonic() < end:
            try:
                health = httpx.get(f"{url}/healthz", timeout=2)
                ready = httpx.get(f"{url}/readyz", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            assert health.status_code == 200
            if ready.status_code == 200:
                break
            assert ready.status_code == 503 and "warming up" in ready.json()["reason"]
            if not seen_loading:
                early = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a", "steps_c": 1, "steps_b": 1},
                                   timeout=30)
                if early.status_code == 200:  # it became ready between the two calls
                    continue
                assert early.status_code == 503 and early.headers["Retry-After"] == "5", early.text
                seen_loading = True
            time.sleep(0.5)
        assert ready.status_code == 200, (tmp_path / "serve.log").read_text()
        assert seen_loading  # the process answered /healthz while the model was still loading
        t_ready = time.monotonic()

        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "in flight", "steps_c": 20, "steps_b": 10}
            inflight = pool.submit(httpx.post, f"{url}/v1/generate", json=body, timeout=120)
            end = time.monotonic() + 30
            while "cascade_rt_requests_running 1.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < end
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            response = inflight.result()
        assert response.status_code == 200 and response.headers["x-seed"] in ("7", "8")  # --seed: 7, 8, ... by default
        # uvicorn finishes the in-flight request, runs the shutdown, then re-raises the signal it caught
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        print(f"ready after {t_ready - t_start:.1f} s, stopped {time.monotonic() - t_ready:.1f} s later")
        text = (tmp_path / "serve.log").read_text()
        assert "Shutting down" in text and "Finished server process" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
