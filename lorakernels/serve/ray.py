"""Scale-out on Ray Serve: replicas of :class:`~.server.DiffusionServer` behind one A1111 API.

Split of work: each replica batches the denoising steps of its requests (mixed adapters in one
UNet call, which ``@serve.batch`` cannot do: it splits batches by multiplexed model id); Ray
routes, replicates, autoscales and restarts.

Deployments (built by :func:`build_app`):

* ``LoRAIngress`` (``@serve.ingress`` FastAPI app, no CPU of its own): the same A1111 endpoints
  as :mod:`.http`. It parses a txt2img payload, draws the seed when it is -1 (so a retry makes
  the same image), and calls a replica with ``multiplexed_model_id`` = the request's *primary
  adapter* (largest UNet strength; no id for base-model requests). Ray's multiplexing routes
  an id to a replica that served it recently, so each replica's adapter pool keeps the
  adapters it serves; a cold id goes to any replica and loads there.
* ``LoRAReplica`` (``replicas`` copies, or autoscaled): one pipeline and one server each; the
  ``@serve.multiplexed`` loader only records the id (the adapter pool loads files when the
  request is admitted, overlapping other requests' steps).

Faults: a replica that dies while a request is on it surfaces in the ingress as an actor
error; the ingress retries the request (same payload, same seed) up to ``retries`` times on
another replica, then answers 503. Every request is answered: by its images, a 4xx/5xx error,
or 503 after the retries, never dropped. Counters: ``GET /metrics`` of the ingress
(``lorakernels_ray_{requests,retried,failed}_total``).

Shutdown: replicas get ``graceful_shutdown_timeout_s = drain_timeout``; Ray stops routing to a
stopping replica and its ``__del__`` drains the server (in-flight requests finish or get 503).

Adapter-set changes: ``POST /sdapi/v1/refresh-loras`` bumps a generation number the ingress
sends with every request; a replica that sees a newer one rescans its folders first.

Everything here imports Ray lazily (``[ray]`` extra). No ``from __future__ import annotations``:
FastAPI resolves the route signatures' ``Request`` annotation, a local name here, at runtime.
"""

import asyncio
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

from ..prompt import parse_prompt

MAX_SEED = 2**32 - 1


def routing_key(payload: Any) -> str:
    """The multiplexed model id of a txt2img payload: its primary adapter's name as written
    (the tag with the largest UNet strength, first on ties), or ``""`` (default routing) for a
    request without adapters or a malformed one (the replica reports the error)."""
    if not isinstance(payload, dict) or payload.get("disable_extra_networks"):
        return ""
    prompt = payload.get("prompt", "")
    try:
        parsed = parse_prompt(prompt if isinstance(prompt, str) else "", None)
    except ValueError:
        return ""
    if not parsed.unet:
        return ""
    return max(parsed.unet.items(), key=lambda kv: abs(kv[1]))[0]


def _actor_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    errors: list[type[BaseException]] = [rex.RayActorError]
    for name in ("ActorUnavailableError", "ActorDiedError"):
        if hasattr(rex, name):
            errors.append(getattr(rex, name))
    return tuple(errors)


def build_app(
    model_dir: str | Path,
    lora_dirs: list[str | Path],
    *,
    model_name: str = "model",
    replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    server_kwargs: dict[str, Any] | None = None,
    affinity: bool = True,
    max_models_per_replica: int = 8,
    replica_cpus: float = 1.0,
    threads: int | None = None,
    retries: int = 2,
    drain_timeout: float = 30.0,
    dtype: str | None = None,
    device: str | None = None,
) -> Any:
    """A Ray Serve application (``serve.run(build_app(...))``) serving ``model_dir`` with the
    LoRAs of ``lora_dirs`` through the A1111 API.

    Args:
        replicas: fixed replica count (ignored when ``autoscaling`` is given).
        autoscaling: Ray Serve ``autoscaling_config`` for the replicas, e.g.
            ``{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}``
            (scaling on ongoing requests per replica: each holds up to ``max_batch_rows``).
        server_kwargs: :class:`~.server.DiffusionServer` options (``max_batch_rows``, …).
        affinity: route by primary adapter (multiplexing); ``False``: Ray's default routing.
        max_models_per_replica: multiplexed ids a replica advertises at once.
        replica_cpus: ``num_cpus`` of each replica (and its torch threads, unless ``threads``).
        retries: attempts on another replica after a replica died under a request.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from ray import serve

    from . import http as lk_http

    n_threads = threads or max(1, int(replica_cpus))

    @serve.deployment(
        ray_actor_options={"num_cpus": replica_cpus},
        graceful_shutdown_timeout_s=drain_timeout,
        max_ongoing_requests=1000,
    )
    class LoRAReplica:
        def __init__(self) -> None:
            import torch

            from .cli import load
            from .server import DiffusionServer

            torch.set_num_threads(n_threads)
            pipe = load(Path(model_dir), dtype, device)
            self.server = DiffusionServer(pipe, lora_dirs, **(server_kwargs or {})).start()
            self.generation = 0
            self.replica = serve.get_replica_context().replica_tag

        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, model_id: str) -> str:
            return model_id  # the adapter pool loads files at admission

        async def txt2img(self, payload: Any, generation: int) -> tuple:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.get_model(model_id)
            if generation > self.generation:
                await asyncio.to_thread(self.server.refresh_adapters)
                self.generation = generation
            reply = await lk_http.txt2img(self.server, payload, model_name)
            return reply.status, reply.body, reply.headers, self.replica

        def loras(self, generation: int) -> list:
            if generation > self.generation:
                self.server.refresh_adapters()
                self.generation = generation
            return lk_http.lora_list(self.server)

        def status(self) -> dict:
            return {"replica": self.replica, **self.server.status()}

        def metrics(self) -> str:
            return self.server.metrics.render(self.server.status())

        def check_health(self) -> None:
            if self.server._loop_error is not None:
                raise RuntimeError(f"server loop failed: {self.server._loop_error!r}")

        def __del__(self) -> None:
            server = getattr(self, "server", None)
            if server is not None:
                server.drain(timeout=drain_timeout)

    replica = LoRAReplica
    if autoscaling:
        replica = replica.options(autoscaling_config=autoscaling)
    else:
        replica = replica.options(num_replicas=replicas)

    app = FastAPI(title="lorakernels (Ray Serve)")
    lk_http.static_routes(app, model_name)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    @serve.ingress(app)
    class LoRAIngress:
        def __init__(self, replicas: Any) -> None:
            self.replicas = replicas
            self.generation = 0
            self.counts = {"requests": 0, "retried": 0, "failed": 0}
            self.lock = threading.Lock()

        @app.post("/sdapi/v1/txt2img")
        async def txt2img(self, request: Request) -> Any:
            try:
                payload = lk_http.parse_body(await request.body())
            except lk_http.RequestError as exc:
                body = {"error": "RequestError", "detail": str(exc), "field": "body"}
                return JSONResponse(body, 422)
            if isinstance(payload, dict) and payload.get("seed", -1) == -1:
                payload["seed"] = random.randint(0, MAX_SEED)  # a retry makes the same image
            key = routing_key(payload) if affinity else ""
            handle = self.replicas.options(multiplexed_model_id=key) if key else self.replicas
            self.counts["requests"] += 1
            last: BaseException | None = None
            for attempt in range(retries + 1):
                if attempt:
                    self.counts["retried"] += 1
                try:
                    status, body, headers, rep = await handle.txt2img.remote(
                        payload, self.generation
                    )
                except _actor_errors() as exc:  # the replica died under the request
                    last = exc
                    await asyncio.sleep(0.5 * attempt)
                    continue
                if status == 499:
                    return JSONResponse(None, 499)
                if status == 200:
                    info = json.loads(body["info"])
                    info["lorakernels"]["replica"] = rep
                    info["lorakernels"]["attempts"] = attempt + 1
                    body["info"] = json.dumps(info)
                return JSONResponse(body, status, headers=headers)
            self.counts["failed"] += 1
            detail = f"the replica serving this request died {retries + 1} times: {last!r}"
            return JSONResponse(
                {"error": "ReplicaFailed", "detail": detail}, 503, headers={"Retry-After": "5"}
            )

        @app.get("/sdapi/v1/loras")
        async def loras(self) -> Any:
            return await self.replicas.loras.remote(self.generation)

        @app.post("/sdapi/v1/refresh-loras")
        async def refresh_loras(self) -> Any:
            self.generation += 1  # every replica rescans before its next request
            await self.replicas.loras.remote(self.generation)
            return None

        @app.get("/health")
        async def health(self) -> Any:
            return {"status": "ok", **(await self.replicas.status.remote())}

        @app.get("/metrics")
        async def metrics(self) -> Any:
            lines = []
            for name, value in self.counts.items():
                lines += [
                    f"# TYPE lorakernels_ray_{name}_total counter",
                    f"lorakernels_ray_{name}_total {value}",
                ]
            text = await self.replicas.metrics.remote()  # one replica's own metrics
            return PlainTextResponse("\n".join(lines) + "\n" + text)

    return LoRAIngress.bind(replica.bind())


def run(args: Any, model_dir: Path, lora_dirs: list[Path], model_name: str) -> int:
    """``lorakernels serve … --ray``: a local Ray cluster, the app on ``--host/--port``, until
    SIGINT/SIGTERM; then Serve shuts down gracefully (replicas drain)."""
    import signal

    import ray
    from ray import serve

    from .cli import server_kwargs

    ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    autoscaling = None
    if args.max_replicas and args.max_replicas > args.replicas:
        autoscaling = {
            "min_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": max(1, args.max_batch_rows // 2),
        }
    app = build_app(
        model_dir,
        [str(d) for d in lora_dirs],
        model_name=model_name,
        replicas=args.replicas,
        autoscaling=autoscaling,
        server_kwargs=server_kwargs(args),
        drain_timeout=args.drain_timeout,
        dtype=args.dtype,
        device=args.device,
    )
    serve.run(app, name="lorakernels", route_prefix="/")
    print(f"lorakernels serve --ray: http://{args.host}:{args.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()
    return 0
