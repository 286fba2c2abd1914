"""A1111-compatible HTTP API over a :class:`~.server.DiffusionServer` (FastAPI + uvicorn).

Endpoints: ``POST /sdapi/v1/txt2img``, ``GET /sdapi/v1/loras``, ``POST /sdapi/v1/refresh-loras``,
``GET /sdapi/v1/samplers``, ``GET /sdapi/v1/scripts``, ``GET /sdapi/v1/sd-models``,
``GET /sdapi/v1/options``, ``GET /health``, ``GET /metrics`` (Prometheus text).

txt2img fields. A1111 clients send the whole payload with every field at its default, so each
field of A1111's ``StableDiffusionProcessingTxt2Img`` API model is accepted:

* implemented: ``prompt`` (with ``<lora:…>`` tags), ``negative_prompt``, ``steps``,
  ``cfg_scale``, ``seed`` (-1: random, reported in ``info``), ``width``, ``height``,
  ``batch_size``, ``n_iter`` (images get seeds ``seed, seed+1, …`` as in A1111),
  ``sampler_name`` (or ``sampler_index``), ``scheduler`` (Automatic/Karras), ``eta``,
  ``send_images``, ``disable_extra_networks``;
* accepted at any value because they have no effect on a txt2img result without hires fix
  (as in A1111): the ``hr_*``/``firstphase_*`` fields and ``denoising_strength`` while
  ``enable_hr`` is false, ``subseed`` while ``subseed_strength`` is 0, ``script_args`` without
  a ``script_name``, ``do_not_save_*``, ``comments``, ``force_task_id``, …;
* accepted only at their no-op default (anything else is refused with 422 naming the field,
  because silently ignoring it would return a wrong image): ``enable_hr``, ``restore_faces``,
  ``tiling``, ``styles``, ``subseed_strength``, ``seed_resize_from_h/w``, ``s_*`` sampler
  overrides, ``override_settings``, ``refiner_checkpoint``, ``script_name``,
  ``alwayson_scripts``, ``save_images``, ``infotext``, ``firstpass_image``.

A field this list does not know is refused (422 naming it), for the same reason.
Errors: 422 ``{"error", "detail", "field"}`` for bad fields or malformed JSON; 404 for an
unknown LoRA (``detail`` names it and close names); 503 with ``Retry-After`` for a full queue or
a draining server; 500 when the request failed inside the model (other requests go on).

Imports FastAPI at import time: this module is the ``[serve]`` extra's entry point.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..prompt import UnknownLoraError
from . import samplers
from .server import DiffusionServer, GenerationRequest, QueueFull, RequestError, ShuttingDown

# implemented fields and their A1111 defaults
IMPLEMENTED: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "steps": 50,
    "cfg_scale": 7.0,
    "seed": -1,
    "width": 512,
    "height": 512,
    "batch_size": 1,
    "n_iter": 1,
    "sampler_name": None,
    "sampler_index": "Euler",
    "scheduler": None,
    "eta": None,
    "send_images": True,
    "disable_extra_networks": False,
}


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v is x or (type(v) is not bool and v == x) for x in values)


# fields accepted only at a no-op value: field -> (predicate, what is accepted)
NOOP_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "enable_hr": (_is(None, False), "false (hires fix is not implemented)"),
    "restore_faces": (_is(None, False), "false (face restoration is not implemented)"),
    "tiling": (_is(None, False), "false (tiling is not implemented)"),
    "styles": (lambda v: v is None or v == [], "empty (styles are not implemented)"),
    "subseed_strength": (_is(None, 0), "0 (variation seeds are not implemented)"),
    "seed_resize_from_h": (_is(None, -1, 0), "-1 or 0 (seed resize is not implemented)"),
    "seed_resize_from_w": (_is(None, -1, 0), "-1 or 0 (seed resize is not implemented)"),
    "s_min_uncond": (_is(None, 0), "0"),
    "s_churn": (_is(None, 0), "0"),
    "s_tmin": (_is(None, 0), "0"),
    "s_tmax": (lambda v: v is None or v == 0 or v == math.inf, "null, 0 or inf"),
    "s_noise": (_is(None, 1), "1"),
    "override_settings": (lambda v: v is None or v == {}, "empty (settings are fixed here)"),
    "refiner_checkpoint": (_is(None, "", "None"), "empty (no refiner)"),
    "script_name": (_is(None, ""), "empty (scripts are not available)"),
    "alwayson_scripts": (lambda v: v is None or v == {}, "empty (scripts are not available)"),
    "save_images": (_is(None, False), "false (this server writes no files)"),
    "infotext": (_is(None, ""), "empty"),
    "firstpass_image": (_is(None, ""), "empty"),
}

# fields with no effect on the result in the cases listed in the module docstring
NO_EFFECT = {
    "subseed",
    "denoising_strength",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_cfg",
    "hr_distilled_cfg",
    "hr_additional_modules",
    "refiner_switch_at",
    "script_args",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings_restore_afterwards",
    "comments",
    "force_task_id",
    "sampler_index",
    "outpath_samples",
    "outpath_grids",
    "prompt_for_display",
    "user",
}


class Reply(NamedTuple):
    """An HTTP answer as plain data (status, JSON body, headers): what Ray replicas return."""

    status: int
    body: Any
    headers: dict[str, str]

    def response(self) -> Response:
        if self.status == 499:
            return Response(status_code=499)
        return JSONResponse(self.body, self.status, headers=self.headers)


def _error(status: int, error: str, detail: str, **extra: Any) -> Reply:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(max(1, math.ceil(extra.pop("retry_after"))))
    return Reply(status, {"error": error, "detail": detail, **extra}, headers)


def _typed(payload: dict[str, Any], name: str, kinds: tuple[type, ...]) -> Any:
    value = payload.get(name, IMPLEMENTED[name])
    if value is None and IMPLEMENTED[name] is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        want = "/".join(k.__name__ for k in kinds)
        raise RequestError(name, f"expected {want}, got {json.dumps(value)}")
    return value


def parse_txt2img(payload: Any) -> tuple[GenerationRequest, bool, dict[str, Any]]:
    """A1111 txt2img JSON -> (request, send_images, the parameters echoed back).

    Raises :class:`RequestError` naming the first field that is wrong or not implemented."""
    if not isinstance(payload, dict):
        raise RequestError("body", "expected a JSON object")
    known = set(IMPLEMENTED) | set(NOOP_ONLY) | NO_EFFECT
    unknown = sorted(set(payload) - known)
    if unknown:
        raise RequestError(unknown[0], "unknown txt2img field; refused rather than ignored")
    for name, (ok, accepted) in NOOP_ONLY.items():
        if name in payload and not ok(payload[name]):
            value = json.dumps(payload[name])[:80]
            raise RequestError(name, f"{value} is not supported; only {accepted}")
    prompt = _typed(payload, "prompt", (str,))
    negative = _typed(payload, "negative_prompt", (str,))
    steps = _typed(payload, "steps", (int,))
    cfg = _typed(payload, "cfg_scale", (int, float))
    seed = _typed(payload, "seed", (int,))
    width = _typed(payload, "width", (int,))
    height = _typed(payload, "height", (int,))
    batch = _typed(payload, "batch_size", (int,))
    n_iter = _typed(payload, "n_iter", (int,))
    # A1111: sampler_name, else sampler_index; our default is its clients' default, "Euler a"
    sampler = _typed(payload, "sampler_name", (str,)) or payload.get("sampler_index")
    if sampler is not None and not isinstance(sampler, str):
        raise RequestError("sampler_index", f"expected str, got {json.dumps(sampler)}")
    sampler = sampler or samplers.DEFAULT_SAMPLER
    scheduler = _typed(payload, "scheduler", (str,))
    eta = _typed(payload, "eta", (int, float))
    send = _typed(payload, "send_images", (bool,))
    no_loras = _typed(payload, "disable_extra_networks", (bool,))
    if batch < 1:
        raise RequestError("batch_size", f"must be >= 1, got {batch}")
    if n_iter < 1:
        raise RequestError("n_iter", f"must be >= 1, got {n_iter}")
    req = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        guidance_scale=float(cfg),
        seed=seed,
        width=width,
        height=height,
        sampler=sampler,
        scheduler=scheduler,
        images=batch * n_iter,
        eta=None if eta is None else float(eta),
        use_loras=not no_loras,
    )
    params = {**IMPLEMENTED, **payload, "sampler_name": sampler}
    return req, send, params


def _png(image: Any) -> str:
    import numpy as np
    from PIL import Image

    arr = (np.clip(image, 0.0, 1.0) * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _info(req: GenerationRequest, params: dict[str, Any], result: Any, model: str) -> str:
    n = len(result.seeds)
    subseed = params.get("subseed", -1)
    subseeds = result.seeds if subseed in (None, -1) else [subseed + i for i in range(n)]
    line = (
        f"Steps: {req.steps}, Sampler: {result.sampler}, CFG scale: {req.guidance_scale:g}, "
        f"Seed: {{seed}}, Size: {req.width}x{req.height}, Model: {model}"
    )
    neg = f"\nNegative prompt: {req.negative_prompt}" if req.negative_prompt else ""
    info = {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n,
        "seed": result.seeds[0],
        "all_seeds": result.seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": 0,
        "width": req.width,
        "height": req.height,
        "sampler_name": result.sampler,
        "cfg_scale": req.guidance_scale,
        "steps": req.steps,
        "batch_size": params.get("batch_size", 1),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.get("denoising_strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [f"{req.prompt}{neg}\n{line.format(seed=s)}" for s in result.seeds],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "lorakernels": {
            "adapters": result.adapters,
            "timings": result.timings,
            "adapters_were_resident": result.adapters_were_resident,
        },
    }
    return json.dumps(info)


def parse_body(raw: bytes) -> Any:
    """The JSON body, or :class:`RequestError` on field ``body``."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"malformed JSON: {exc}") from None


async def txt2img(
    server: DiffusionServer,
    payload: Any,
    model_name: str,
    is_disconnected: Callable[[], Any] | None = None,
) -> Reply:
    """``POST /sdapi/v1/txt2img`` on ``server``; awaits the images. ``is_disconnected``
    (async) is polled while waiting: a gone client cancels its request (status 499).
    Cancelling the awaiting task cancels the request too."""
    try:
        req, send, params = parse_txt2img(payload)
        future = server.enqueue(req)
    except RequestError as exc:
        return _error(422, "RequestError", str(exc), field=exc.field)
    except UnknownLoraError as exc:
        return _error(404, "UnknownLora", str(exc), lora=exc.name, field="prompt")
    except ValueError as exc:  # a malformed <lora:…> tag
        return _error(422, "RequestError", f"prompt: {exc}", field="prompt")
    except QueueFull as exc:
        return _error(503, "QueueFull", str(exc), retry_after=exc.retry_after)
    except ShuttingDown as exc:
        return _error(503, "ShuttingDown", str(exc), retry_after=5)
    waiter = asyncio.wrap_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                break
            if is_disconnected is not None and await is_disconnected():
                future.cancel()  # frees the request's rows before the next step
                return Reply(499, None, {})
    except asyncio.CancelledError:
        future.cancel()
        raise
    try:
        result = waiter.result()
    except ShuttingDown as exc:
        return _error(503, "ShuttingDown", str(exc), retry_after=5)
    except Exception as exc:  # noqa: BLE001 - this request failed; report it
        return _error(500, type(exc).__name__, str(exc))
    images = await asyncio.to_thread(lambda: [_png(i) for i in result.images]) if send else []
    info = _info(req, params, result, model_name)
    return Reply(200, {"images": images, "parameters": params, "info": info}, {})


def lora_list(server: DiffusionServer) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras``: ``[{"name", "alias", "path", "metadata"}]``."""
    return [
        {
            "name": a.name,
            "alias": a.aliases[0] if a.aliases else a.name,
            "path": a.path,
            "metadata": dict(a.metadata),
        }
        for a in server.adapters()
    ]


def static_routes(app: FastAPI, model_name: str) -> None:
    """The endpoints that need no server: samplers, scripts, sd-models, options."""

    @app.get("/sdapi/v1/samplers")
    async def sampler_list() -> Any:
        return samplers.a1111_list()

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> Any:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> Any:
        return [
            {
                "title": model_name,
                "model_name": model_name,
                "hash": None,
                "sha256": None,
                "filename": model_name,
                "config": None,
            }
        ]

    @app.get("/sdapi/v1/options")
    async def options() -> Any:
        return {"sd_model_checkpoint": model_name, "CLIP_stop_at_last_layers": 1}


def create_app(
    server: DiffusionServer,
    *,
    model_name: str = "model",
    drain_timeout: float = 30.0,
    manage_server: bool = True,
) -> FastAPI:
    """The FastAPI app. With ``manage_server`` the app starts the server's worker at startup
    and drains it at shutdown (bounded by ``drain_timeout`` seconds)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_server:
            server.start()
        yield
        if manage_server:
            await asyncio.to_thread(server.drain, drain_timeout)

    app = FastAPI(title="lorakernels", lifespan=lifespan)
    app.state.server = server
    static_routes(app, model_name)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img_route(request: Request) -> Any:
        try:
            payload = parse_body(await request.body())
        except RequestError as exc:
            return _error(422, "RequestError", str(exc), field="body").response()
        reply = await txt2img(server, payload, model_name, request.is_disconnected)
        return reply.response()

    @app.get("/sdapi/v1/loras")
    async def loras() -> Any:
        return await asyncio.to_thread(lora_list, server)

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> Any:
        await asyncio.to_thread(server.refresh_adapters)
        return None

    @app.get("/health")
    async def health() -> Any:
        status = server.status()
        body = {"status": "ok" if server.accepting else "draining", **status}
        return JSONResponse(body, 200 if server.accepting else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(server.metrics.render(server.status()))

    return app


def run(
    server: DiffusionServer,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    model_name: str = "model",
    drain_timeout: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve until SIGINT/SIGTERM. On the signal uvicorn stops listening, the server refuses new
    requests and lets in-flight ones finish for up to ``drain_timeout`` seconds; requests still
    running then are answered 503. Then the process exits."""
    import uvicorn

    app = create_app(server, model_name=model_name, drain_timeout=drain_timeout)

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            drained = asyncio.get_running_loop().run_in_executor(None, server.drain, drain_timeout)
            await super().shutdown(sockets)
            await drained

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(drain_timeout) + 5,
    )
    _Server(config).run()
