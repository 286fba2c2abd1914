"""The A1111 HTTP API: in-process through ASGI, and one real ``lorakernels serve --demo``
process on 127.0.0.1 (client disconnect cancels, SIGTERM drains)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from lorakernels.serve import demo  # noqa: E402
from lorakernels.serve.http import create_app  # noqa: E402
from lorakernels.serve.server import DiffusionServer, GenerationRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# what A1111 clients send: every field of the txt2img model at its default
A1111_DEFAULTS = {
    "prompt": "",
    "negative_prompt": "",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": "Euler a",
    "batch_size": 1,
    "n_iter": 1,
    "steps": 50,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": 0,
    "s_min_uncond": 0,
    "s_churn": 0,
    "s_tmax": None,
    "s_tmin": 0,
    "s_noise": 1,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "comments": {},
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2,
    "hr_upscaler": None,
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "sampler_index": "Euler",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    return demo.build(tmp_path_factory.getbasetemp() / "lkdemo")


@pytest.fixture(scope="module")
def server(demo_dirs, tmp_path_factory):
    model, loras = demo_dirs
    folder = tmp_path_factory.mktemp("loras_http")
    for f in loras.iterdir():
        shutil.copy(f, folder / f.name)
    srv = DiffusionServer(demo.load_pipeline(model), [folder], max_batch_rows=8, max_size=256)
    srv.start()
    srv.lora_folder = folder
    yield srv
    srv.drain(timeout=5)


def _call(server, method, path, body=None, raw=None):
    async def go():
        app = create_app(server, model_name="demo", manage_server=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            if raw is not None:
                return await client.request(method, path, content=raw)
            return await client.request(method, path, json=body)

    return asyncio.run(go())


def _many(server, bodies):
    async def go():
        app = create_app(server, model_name="demo", manage_server=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            return await asyncio.gather(*(c.post("/sdapi/v1/txt2img", json=b) for b in bodies))

    return asyncio.run(go())


def _png(b64):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _body(**kw):
    return {**A1111_DEFAULTS, "steps": 3, "width": 32, "height": 32, **kw}


def test_txt2img_full_a1111_payload(server):
    bodies = [
        _body(prompt="<lora:ink:1> a cat", seed=5),
        _body(prompt="<lora:cyber_v1:0.8> a cat", seed=5, batch_size=2, n_iter=2),
        _body(prompt="<lora:ink:1> a cat", seed=5),  # same as the first
        _body(prompt="<lora:tarot:1> a dog", seed=-1, sampler_name="DPM++ 2M Karras"),
        _body(prompt="<lora:ink:1> a cat", seed=5, disable_extra_networks=True),
    ]
    r = _many(server, bodies)
    assert [x.status_code for x in r] == [200] * 5, [x.text for x in r]
    out = [x.json() for x in r]
    imgs = [[_png(i) for i in o["images"]] for o in out]
    assert imgs[0][0].shape == (32, 32, 3) and len(imgs[1]) == 4
    info = [json.loads(o["info"]) for o in out]
    assert info[1]["all_seeds"] == [5, 6, 7, 8] and info[0]["seed"] == 5
    assert 0 <= info[3]["seed"] < 2**32 and info[3]["sampler_name"] == "DPM++ 2M Karras"
    assert out[0]["parameters"]["prompt"] == "<lora:ink:1> a cat"
    # same seed and tags: the same image up to one 8-bit level (fp32 batching noise near a
    # rounding boundary; the float images agree to ~1e-6, see test_serve.py)
    assert np.abs(imgs[0][0].astype(int) - imgs[2][0]).max() <= 1
    assert np.abs(imgs[0][0].astype(int) - imgs[1][0]).mean() > 5  # another LoRA
    assert np.abs(imgs[0][0].astype(int) - imgs[4][0]).mean() > 5  # tags disabled
    assert info[0]["lorakernels"]["adapters"]["unet"] == {"ink": 1.0}
    assert info[4]["lorakernels"]["adapters"]["unet"] == {}


@pytest.mark.parametrize(
    "change,field,status",
    [
        ({"enable_hr": True}, "enable_hr", 422),
        ({"restore_faces": True}, "restore_faces", 422),
        ({"styles": ["anime"]}, "styles", 422),
        ({"subseed_strength": 0.5}, "subseed_strength", 422),
        ({"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts", 422),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings", 422),
        ({"script_name": "x/y/z plot"}, "script_name", 422),
        ({"save_images": True}, "save_images", 422),
        ({"new_field": 1}, "new_field", 422),
        ({"steps": 0}, "steps", 422),
        ({"steps": "20"}, "steps", 422),
        ({"width": 36}, "width", 422),
        ({"height": 512}, "height", 422),  # over this server's max_size=256
        ({"batch_size": 0}, "batch_size", 422),
        ({"sampler_name": "Euler z"}, "sampler_name", 422),
        ({"prompt": "<lora:inkk:1> a cat"}, "prompt", 404),
        ({"prompt": "<lora:ink:x> a cat"}, "prompt", 422),
    ],
)
def test_bad_input_is_refused_naming_the_field(server, change, field, status):
    r = _call(server, "POST", "/sdapi/v1/txt2img", _body(**change))
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert field in r.json()["detail"]
    if status == 404:
        assert "did you mean 'ink'" in r.json()["detail"]


def test_malformed_json_is_422(server):
    r = _call(server, "POST", "/sdapi/v1/txt2img", raw=b'{"prompt": "a cat",')
    assert r.status_code == 422 and r.json()["field"] == "body"


def test_lora_list_refresh_samplers_scripts_health_metrics(server):
    loras = _call(server, "GET", "/sdapi/v1/loras").json()
    assert {x["name"] for x in loras} == {"ink", "cyber", "tarot", "pastel"}
    ink = next(x for x in loras if x["name"] == "ink")
    assert ink["alias"] == "ink_v1" and ink["metadata"]["ss_output_name"] == "ink_v1"
    shutil.copy(Path(ink["path"]), server.lora_folder / "ink2.safetensors")
    assert _call(server, "POST", "/sdapi/v1/refresh-loras").status_code == 200
    names = {x["name"] for x in _call(server, "GET", "/sdapi/v1/loras").json()}
    assert "ink2" in names
    assert _call(server, "POST", "/sdapi/v1/txt2img", _body(prompt="<lora:ink2:1> a")).is_success
    samplers = [s["name"] for s in _call(server, "GET", "/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= set(samplers)
    assert _call(server, "GET", "/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert _call(server, "GET", "/health").json()["status"] == "ok"
    text = _call(server, "GET", "/metrics").text
    for name in (
        "queue_depth",
        "rows_per_unet_call_bucket",
        "steps_per_second",
        "images_per_second",
        "resident_adapters",
        "pool_hits",
        "pool_misses",
        "pool_evictions",
        "request_latency_seconds_bucket",
    ):
        assert f"lorakernels_serve_{name}" in text


def test_full_queue_is_503_with_retry_after(demo_dirs):
    model, loras = demo_dirs
    srv = DiffusionServer(demo.load_pipeline(model), [loras], max_queue=1)  # not started
    srv.enqueue(GenerationRequest("a cat", width=32, height=32, steps=2))
    r = _call(srv, "POST", "/sdapi/v1/txt2img", _body(prompt="a dog"))
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert srv.drain(timeout=0) == 1


# ------------------------------------------------------------------ a real process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process(demo_dirs):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lorakernels",
        "serve",
        "--demo",
        "--demo-dir",
        str(demo_dirs[0].parent),
        "--port",
        str(port),
        "--max-batch-rows",
        "2",
        "--drain-timeout",
        "30",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _metric(url, name):
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f"lorakernels_serve_{name} "):
            return float(line.split()[1])
    raise KeyError(name)


def test_process_disconnect_cancels_and_sigterm_drains(process):
    proc, url = process
    # a client that gives up: its request is cancelled and its rows freed
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/sdapi/v1/txt2img", json=_body(steps=150), timeout=1.0)
    deadline = time.monotonic() + 30
    while _metric(url, "requests_cancelled_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(url, "requests_cancelled_total") == 1
    assert _metric(url, "active_rows") == 0
    # three requests in flight, then SIGTERM: all three answered, then the process exits
    results: list[int] = []

    def client(i):
        body = _body(prompt=f"<lora:ink:{i}> a cat", steps=8, seed=i)
        results.append(httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    while _metric(url, "requests_total") < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [200, 200, 200]
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so the exit status is
    # the signal's (the drain is what the three 200s above show)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
