"""Ray Serve: a local cluster with two tiny replicas; one killed under load is replaced, its requests end in 5xx.
The replicas load an inpainting ControlNet: control images pass through the one-deployment and the split apps."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.serve.conftest import FAST, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow  # a Ray cluster and three replica starts: about a minute on 2 CPU cores
PIPELINE = {"random_weights": True, "preset": "tiny", "device": "cpu", "dtype": "float32", "controlnet": "inpainting"}


@pytest.fixture(scope="module")
def ray_url():
    from cascade_rt.serve.app import ServeConfig
    from cascade_rt.serve.ray_app import build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(sizes=((256, 256),), max_batch=2, max_wait_ms=20, warmup_steps=0, random_weights=True)
        app = build_app(dict(PIPELINE), config, num_replicas=2, cpus_per_replica=1)
        serve.run(app, name="cascade-rt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replicas() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::"))


def generate(url: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": "a", "seed": seed, **FAST}, timeout=60)


def test_two_replicas_answer_and_a_killed_one_is_replaced(ray_url):
    served = {generate(ray_url, i).headers["x-served-by"] for i in range(12)}
    assert len(served) == 2, served  # Ray routes to both replicas
    first = generate(ray_url, 0)
    assert first.status_code == 200 and len(first.json()["data"]) == 1

    results: list[tuple[float, int]] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:  # a client that keeps sending; every request must end, with 200 or a clear 5xx
        i = 0
        while not stop.is_set():
            try:
                r = generate(ray_url, i)
                results.append((time.monotonic(), r.status_code))
                if r.status_code != 200:
                    errors.append(r.text)
            except httpx.TimeoutException:  # a hang: the test fails below
                results.append((time.monotonic(), -1))
            i += 1

    clients = [threading.Thread(target=load) for _ in range(3)]
    for t in clients:
        t.start()
    time.sleep(2)
    victim = replicas()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed = time.monotonic()
    time.sleep(6)
    stop.set()
    for t in clients:
        t.join(timeout=90)
    codes = [c for _, c in results]
    assert -1 not in codes and all(c == 200 or c >= 500 for c in codes), codes
    assert all(errors)  # each failure says something
    assert any(c == 200 for when, c in results if when > killed + 1)  # the other replica kept answering
    print(f"under load: {codes.count(200)} answered 200, {len(errors)} ended in 5xx when the replica died: "
          f"{sorted({c for c in codes if c != 200})}; {errors[:1]}")

    end = time.monotonic() + 90  # Ray starts a replacement
    while time.monotonic() < end:
        names = replicas()
        if len(names) == 2 and victim not in names:
            status = serve.status().applications["cascade-rt"]
            if status.status == "RUNNING":
                break
        time.sleep(1)
    assert len(replicas()) == 2 and victim not in replicas()
    after = {generate(ray_url, i).headers["x-served-by"] for i in range(12)}
    assert len(after) == 2 and after != served  # two replicas again, one of them new


def test_split_stage_c_and_stage_ba_deployments_compose_one_request_path(ray_url, tiny_pipe):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from cascade_rt.serve.app import ServeConfig
    from cascade_rt.serve.ray_app import build_split_app

    config = ServeConfig(sizes=((256, 256),), max_batch=2, max_wait_ms=20, warmup_steps=0, random_weights=True)
    app = build_split_app(dict(PIPELINE), config, cpus_per_replica=0.5, name="Split")
    serve.run(app, name="split", route_prefix="/split")
    names = {a["name"].split("#")[1] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::split#")}
    assert names == {"Split", "SplitStageC", "SplitStageBA"}
    body = {"prompt": "a kite", "n": 2, "seed": 21, **FAST}
    r = httpx.post(f"{ray_url}/split/v1/images/generations", json=body, timeout=120)
    whole = httpx.post(f"{ray_url}/v1/images/generations", json=body, timeout=120)  # the one-deployment app
    assert r.status_code == 200 and whole.status_code == 200, r.text

    def decode(response):
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in response.json()["data"]]

    # the generators travelled with the Stage C result: the same images as the one-deployment app (replicas of
    # both run with Ray's one thread per CPU), and as this process's pipeline up to its thread count's rounding
    for image, same, want in zip(decode(r), decode(whole), tiny_pipe("a kite", images_per_prompt=2, seed=21,
                                                                     height=256, width=256, **FAST).images):
        assert np.array_equal(image, same)
        assert np.abs(image.astype(float) - np.asarray(want, dtype=float)).mean() < 1.0

    # a control image and mask travel to the Stage C deployment, which computes the projections
    import torch

    from cascade_rt import load_pipeline

    control = Image.fromarray(np.random.default_rng(2).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (32, 32, 160, 200))

    def b64(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {"prompt": "a kite", "seed": 22, "control_image": b64(control), "mask": b64(mask), "control_strength": 2.0,
            **FAST}
    split = httpx.post(f"{ray_url}/split/v1/generate", json=body, timeout=120)
    whole = httpx.post(f"{ray_url}/v1/generate", json=body, timeout=120)
    assert split.status_code == 200 and whole.status_code == 200, split.text[:300]
    refused = httpx.post(f"{ray_url}/split/v1/generate", json={"prompt": "a", "mask": b64(mask)}, timeout=30)
    assert refused.status_code == 400 and "mask without a control image" in refused.json()["error"]["message"]
    served = [np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=float) for r in (split, whole)]
    assert np.array_equal(served[0], served[1])
    pipe = load_pipeline(**{**PIPELINE, "dtype": torch.float32, "seed": 0})
    kw = dict(seed=22, height=256, width=256, **FAST)
    want = np.asarray(pipe("a kite", control_image=control, mask=mask, control_strength=2.0, **kw).images[0], float)
    plain = np.asarray(pipe("a kite", **kw).images[0], float)
    assert np.abs(served[0] - want).mean() < 0.1 * np.abs(want - plain).mean()  # up to the thread count's rounding
    serve.delete("split")
