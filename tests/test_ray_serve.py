"""Ray Serve scale-out, black box over HTTP on a local cluster (2 CPUs, 127.0.0.1, no
dashboard): the A1111 API with 2 replicas of the demo pipeline, then a replica killed under
load: every request answered (images, or an explicit error), none dropped."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from lorakernels.serve import demo  # noqa: E402
from lorakernels.serve.ray import build_app, routing_key  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model, loras = demo.build(tmp_path_factory.getbasetemp() / "lkdemo")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        str(model),
        [str(loras)],
        model_name="demo",
        replicas=2,
        replica_cpus=1,
        server_kwargs={"max_batch_rows": 8, "max_size": 256},
        drain_timeout=10,
    )
    serve.run(app, name="lk", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield url
    serve.shutdown()
    ray.shutdown()


def _body(**kw):
    return {"steps": 3, "width": 32, "height": 32, "sampler_name": "Euler a", **kw}


def _post_all(url, bodies, timeout=180):
    out: list = [None] * len(bodies)

    def go(i):
        try:
            out[i] = httpx.post(url + "/sdapi/v1/txt2img", json=bodies[i], timeout=timeout)
        except httpx.HTTPError as exc:  # recorded: the test asserts none happened
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _png(b64):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def test_routing_key_is_the_primary_adapter():
    assert routing_key({"prompt": "<lora:a:0.5> <lora:b:0.9> x"}) == "b"
    assert routing_key({"prompt": "a cat"}) == ""
    assert routing_key({"prompt": "<lora:a:1> x", "disable_extra_networks": True}) == ""


def test_a1111_api_on_two_replicas(cluster):
    url = cluster
    bodies = [_body(prompt=f"<lora:{n}:1> a cat", seed=7) for n in ("ink", "cyber", "tarot")]
    bodies += [_body(prompt="<lora:ink:1> a cat", seed=7), _body(prompt="a cat", seed=7)]
    r = _post_all(url, bodies)
    assert [x.status_code for x in r] == [200] * 5, [getattr(x, "text", x) for x in r]
    imgs = [_png(x.json()["images"][0]) for x in r]
    infos = [json.loads(x.json()["info"]) for x in r]
    assert all(i["seed"] == 7 for i in infos)
    assert np.abs(imgs[0] - imgs[3]).max() <= 1  # same tags and seed: same image (±1 level)
    for j in (1, 2, 4):
        assert np.abs(imgs[0] - imgs[j]).mean() > 5  # other adapters: another image
    # seed -1 is drawn by the ingress and reported
    r = httpx.post(url + "/sdapi/v1/txt2img", json=_body(prompt="a dog", seed=-1), timeout=120)
    assert r.status_code == 200 and 0 <= json.loads(r.json()["info"])["seed"] < 2**32
    # bad input: 4xx naming the field
    for body, status, field in [
        (_body(prompt="a", width=36), 422, "width"),
        (_body(prompt="<lora:inkk:1> a"), 404, "prompt"),
        (_body(prompt="a", enable_hr=True), 422, "enable_hr"),
    ]:
        r = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=60)
        assert r.status_code == status and r.json()["field"] == field, r.text
    r = httpx.post(url + "/sdapi/v1/txt2img", content=b"{", timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "body"
    names = {x["name"] for x in httpx.get(url + "/sdapi/v1/loras", timeout=60).json()}
    assert names == {"ink", "cyber", "tarot", "pastel"}
    assert httpx.get(url + "/sdapi/v1/samplers", timeout=60).status_code == 200


def _replica_actors():
    from ray.util import list_named_actors

    return [a["name"] for a in list_named_actors(all_namespaces=True) if "LoRAReplica" in a["name"]]


def test_killed_replica_loses_no_request(cluster):
    url = cluster
    names = ["ink", "cyber", "tarot", "pastel"]
    # 30 steps: several seconds of work per replica, so the kill at 1.5 s lands mid-load
    bodies = [
        _body(prompt=f"<lora:{names[i % 4]}:1> a cat", seed=100 + i, steps=30) for i in range(12)
    ]
    results: list = []
    killer_done = threading.Event()

    def killer():
        time.sleep(1.5)  # requests are in flight on both replicas by now
        victim = _replica_actors()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
        killer_done.set()

    t = threading.Thread(target=killer)
    t.start()
    results = _post_all(url, bodies, timeout=300)
    t.join()
    assert killer_done.is_set()
    statuses = [getattr(r, "status_code", None) for r in results]
    # every request answered: images, or an explicit 5xx error naming the failure
    assert None not in statuses, results
    assert all(s == 200 or s in (500, 503) for s in statuses), statuses
    ok = [r for r in results if r.status_code == 200]
    seeds = sorted(json.loads(r.json()["info"])["seed"] for r in ok)
    assert len(seeds) == len(set(seeds))  # nobody answered twice
    metrics = httpx.get(url + "/metrics", timeout=60).text
    counts = {
        k: float(line.split()[1])
        for line in metrics.splitlines()
        for k in ("requests", "retried", "failed")
        if line.startswith(f"lorakernels_ray_{k}_total ")
    }
    print(
        f"\nreplica kill: sent {len(bodies)}, answered 200: {len(ok)}, "
        f"errors: {len(bodies) - len(ok)}, ingress counters: {counts}"
    )
    replica_failed = [
        r for r in results if r.status_code == 503 and r.json().get("error") == "ReplicaFailed"
    ]
    assert counts["failed"] == len(replica_failed)
    assert counts["retried"] >= 1  # the kill did hit requests in flight
