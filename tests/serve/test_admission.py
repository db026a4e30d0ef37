"""Admission control: refusals before the queue, overload, deadlines, disconnects, a NaN batch."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch

from tests.serve.conftest import FAST, start_server

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc000000301"
    "0100c9fe92ef0000000049454e44ae426082"
)

BAD = [  # (endpoint, body kwargs for httpx, expected status, words in the reason)
    ("generations", {"json": {"prompt": "a", "size": "300x300"}}, 400, "multiple of 128"),
    ("generations", {"json": {"prompt": "a", "size": "512x512"}}, 400, "not served here"),
    ("generations", {"json": {"prompt": "a", "size": "large"}}, 400, "WIDTHxHEIGHT"),
    ("generations", {"json": {"prompt": "a", "n": 9}}, 400, "largest batch (4)"),
    ("generations", {"json": {"prompt": "a", "n": 0}}, 422, "n: Input should be greater than or equal to 1"),
    ("generations", {"content": b'{"prompt": "a",'}, 400, "not valid JSON"),
    ("generations", {"json": ["a"]}, 422, "must be a JSON object"),
    ("generations", {"json": {"n": 1}}, 422, "prompt: Field required"),
    ("generations", {"json": {"prompt": "  "}}, 400, "prompt is empty"),
    ("generations", {"json": {"prompt": "a", "stepz": 3}}, 422, "stepz: Extra inputs are not permitted"),
    ("generations", {"json": {"prompt": "a", "response_format": "url"}}, 400, "use 'b64_json'"),
    ("generations", {"json": {"prompt": "a", "steps_c": 0}}, 422, "steps_c"),
    ("generations", {"json": {"prompt": "a", "steps_b": 1000}}, 422, "steps_b"),
    ("generations", {"json": {"prompt": "a", "seed": -1}}, 422, "seed"),
    ("generations", {"json": {"prompt": "a"}, "headers": {"X-Request-Timeout": "soon"}}, 400, "X-Request-Timeout"),
    ("edits", {"files": {"image": ("x.png", b"not an image", "image/png")}, "data": {"prompt": "a"}}, 400,
     "cannot be decoded as an image"),
    ("edits", {"data": {"prompt": "a"}, "files": {"other": ("x.png", PNG_1PX, "image/png")}}, 400, "other"),
    ("edits", {"files": {"image": ("x.png", PNG_1PX, "image/png"), "mask": ("m.png", PNG_1PX, "image/png")},
               "data": {"prompt": "a"}}, 400, "mask: this server has no ControlNet loaded"),
    ("edits", {"files": {"image": ("x.png", PNG_1PX, "image/png"), "control_image": ("c.png", PNG_1PX, "image/png")},
               "data": {"prompt": "a"}}, 400, "start the server with --controlnet canny|inpainting|sr"),
    ("edits", {"files": {"image": ("x.png", PNG_1PX, "image/png")}, "data": {"prompt": "a", "n": "two"}}, 422,
     "'two' is not a number"),
    ("edits", {"json": {"prompt": "a"}}, 400, "multipart/form-data"),
    ("generate", {"json": {"prompt": "a", "n": 2}}, 400, "n must be 1"),
    ("generate", {"content": b'{"prompt": "' + b"a" * (30 * 2**20) + b'"}'}, 413, "the limit is"),
    ("generate", {"json": {"prompt": "a", "image": "%%%"}}, 400, "not base64"),
    ("generate", {"json": {"prompt": "a", "image": "aGVsbG8="}}, 400, "cannot be decoded as an image"),
    ("generate", {"json": {"prompt": "a", "control_image": base64.b64encode(PNG_1PX).decode()}}, 400,
     "control_image: this server has no ControlNet loaded"),
]
PATHS = {"generations": "/v1/images/generations", "edits": "/v1/images/edits", "generate": "/v1/generate"}


@pytest.mark.parametrize("endpoint,kwargs,status,reason", BAD, ids=[f"{b[0]}-{b[3][:24]}" for b in BAD])
def test_bad_input_is_refused_before_the_queue(server, endpoint, kwargs, status, reason):
    before = server.batches()
    r = httpx.post(server.url + PATHS[endpoint], timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert reason in error["message"], error
    assert server.batches() == before and server.service.batcher.waiting == 0


@pytest.fixture(scope="module")
def small(tiny_pipe):
    running = start_server(tiny_pipe, max_batch=2, max_wait_ms=50, max_queue=2)
    yield running
    running.stop()


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=120, **kw)


@contextmanager
def busy(running):
    """The model worker holds its next batch until the block ends: later requests queue behind it."""
    engine = running.service.batcher.engine
    release, started = threading.Event(), threading.Event()
    real = engine.prior

    def held(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    engine.prior = held
    try:
        yield started
    finally:
        release.set()
        del engine.prior  # back to the class's method


def test_overload_burst_gets_429_and_every_accepted_request_completes(small):
    before = small.batches()
    with ThreadPoolExecutor(12) as pool:
        with busy(small) as started:  # the first batch is held: the burst meets a full queue
            futures = [pool.submit(post, small.url, {"prompt": f"p{i}", "seed": i, **FAST}) for i in range(12)]
            assert started.wait(10)
            end = time.monotonic() + 20
            while sum(f.done() for f in futures) < 8 and time.monotonic() < end:
                time.sleep(0.05)
        responses = [f.result() for f in futures]
    codes = [r.status_code for r in responses]
    accepted = codes.count(200)
    # the held batch (1 or 2 requests, max_batch 2) + 2 waiting (max_queue 2); all others are refused at once
    assert 3 <= accepted <= 4 and codes.count(429) == 12 - accepted, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]["message"]
        else:
            assert len(r.json()["data"]) == 1
    assert small.batches() - before >= accepted / 2  # every accepted request ran (at most 2 per batch)
    metrics = httpx.get(f"{small.url}/metrics").text
    assert 'cascade_rt_requests_total{endpoint="generations",status="429"}' in metrics


def test_deadline_gives_504_and_drops_the_queued_work(small):
    before = small.batches()
    with ThreadPoolExecutor(2) as pool, busy(small) as started:
        slow = pool.submit(post, small.url, {"prompt": "slow", "seed": 1, **FAST})
        assert started.wait(10)  # the first batch has started (and is held)
        late = pool.submit(post, small.url, {"prompt": "late", "seed": 2, "steps_c": 3, "steps_b": 2},
                           headers={"X-Request-Timeout": "0.3"})
        assert late.result().status_code == 504, late.result().text
        assert "deadline" in late.result().json()["error"]["message"]
    assert slow.result().status_code == 200
    time.sleep(0.2)
    assert small.batches() - before == 1  # the late request never ran


def test_client_disconnect_cancels_queued_work(small):
    before = small.batches()
    with ThreadPoolExecutor(1) as pool, busy(small) as started:
        slow = pool.submit(post, small.url, {"prompt": "slow", "seed": 3, **FAST})
        assert started.wait(10)
        host, port = small.url.removeprefix("http://").split(":")
        body = b'{"prompt": "gone", "seed": 4, "steps_c": 2, "steps_b": 2}'
        with socket.create_connection((host, int(port))) as s:  # a client that sends and then hangs up
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.2)
            assert small.service.batcher.waiting == 1
        time.sleep(0.3)  # the server notices the hang-up while the worker is still held
    assert slow.result().status_code == 200
    time.sleep(0.3)
    assert small.service.batcher.waiting == 0 and small.batches() - before == 1  # dropped, never run
    assert 'status="499"' in httpx.get(f"{small.url}/metrics").text


def test_nan_stage_output_fails_the_batch_with_500_and_the_server_keeps_serving(small):
    stage_b = small.pipe.runners["b"].model
    weight = next(p for p in stage_b.parameters() if p.dim() == 4)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        r = post(small.url, {"prompt": "nan", "seed": 5, **FAST})
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    assert "Stage B produced NaN/Inf" in message, message
    again = post(small.url, {"prompt": "fine", "seed": 5, **FAST})
    assert again.status_code == 200 and httpx.get(f"{small.url}/healthz").status_code == 200
