"""The official `openai` client, unchanged, against the server; the native PNG endpoint; streamed previews."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import FAST

openai = pytest.importorskip("openai")


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_generates_images_of_the_asked_size(server, client):
    result = client.images.generate(prompt="a red cube", n=2, size="256x256", response_format="b64_json",
                                    extra_body={**FAST, "seed": 11})
    assert len(result.data) == 2
    images = [decode(d.b64_json) for d in result.data]
    assert all(im.size == (256, 256) and im.mode == "RGB" for im in images)
    meta = json.loads(images[0].text["cascade-rt"])
    assert meta["seed"] == 11 and meta["steps_c"] == 2 and meta["prompt"] == "a red cube"
    # the same request alone in the pipeline: same images, bit for bit (a batch of one request)
    ref = server.pipe("a red cube", images_per_prompt=2, seed=11, height=256, width=256, **FAST)
    for got, want in zip(images, ref.images):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # create_variation: deprecated upstream, still sent
def test_openai_client_edit_and_variation(server, client):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    edit = client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="make it blue", size="256x256",
                              extra_body={**FAST, "seed": 5, "strength": 0.5})
    got = decode(edit.data[0].b64_json)
    ref = server.pipe("make it blue", seed=5, height=256, width=256, image=source, strength=0.5, **FAST)
    assert got.size == (256, 256) and np.array_equal(np.asarray(got), np.asarray(ref.images[0]))

    variation = client.images.create_variation(image=("in.png", buf.getvalue(), "image/png"), n=1,
                                               extra_body={**FAST, "seed": 6})
    got = decode(variation.data[0].b64_json)
    ref = server.pipe("", seed=6, height=256, width=256, clip_image=source, **FAST)
    assert np.array_equal(np.asarray(got), np.asarray(ref.images[0]))


def test_native_generate_returns_png_with_metadata(server):
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a lamp", "seed": 3, "negative_prompt": "fog", **FAST},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "3"
    image = Image.open(io.BytesIO(r.content))
    meta = json.loads(image.text["cascade-rt"])
    assert (meta["prompt"], meta["negative"], meta["seed"], meta["width"]) == ("a lamp", "fog", 3, 256)
    assert "RANDOM WEIGHTS" in image.text["cascade-rt-weights"]
    ref = server.pipe("a lamp", "fog", seed=3, height=256, width=256, **FAST)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref.images[0]))


def test_native_generate_image_to_image(server):
    source = Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    body = {"prompt": "a lamp", "seed": 8, "image": base64.b64encode(buf.getvalue()).decode(), "strength": 0.6, **FAST}
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(r.content))
    assert json.loads(image.text["cascade-rt"])["mode"] == "image"
    ref = server.pipe("a lamp", seed=8, height=256, width=256, image=source, strength=0.6, **FAST)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref.images[0]))


def test_stream_sends_the_stage_c_preview_then_the_image(server):
    events = []
    body = {"prompt": "a boat", "seed": 4, "stream": True, **FAST}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    ref = server.pipe("a boat", seed=4, height=256, width=256, preview=True, **FAST)
    preview, final = decode(events[0]["b64_json"]), decode(events[1]["b64_json"])
    assert np.array_equal(np.asarray(preview), np.asarray(ref.previews[0]))
    assert np.array_equal(np.asarray(final), np.asarray(ref.images[0]))


def test_health_ready_models_and_metrics(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["sizes"] == ["256x256"] and ready["max_batch"] == 4
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["object"] == "model"
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("cascade_rt_queue_depth", "cascade_rt_batch_size_images_bucket", "cascade_rt_stage_seconds_bucket",
                 "cascade_rt_request_seconds_bucket", "cascade_rt_requests_total", "cascade_rt_ready 1.0"):
        assert name in text, name
    assert 'cascade_rt_stage_seconds_count{stage="stage_c"}' in text
