"""``DiffusionServer``: requests in, images out, every denoising step batched across requests.

::

    server = DiffusionServer(pipe, lora_dirs=["loras/"], max_batch_rows=16)
    server.start()
    result = await server.submit(GenerationRequest("<lora:ink:0.8> a cat", steps=20, seed=1))
    result.images[0]      # float32 [H, W, 3] in [0, 1], as the pipeline's output_type="np"

Life of a request: :meth:`submit` validates it and resolves its ``<lora:…>`` tags (unknown
names raise :class:`~lorakernels.prompt.UnknownLoraError` with close names) on the caller's
thread, then queues it (FIFO; a full queue raises :class:`QueueFull`). The worker thread (the
only thread that runs the models: the patched layers read one active batch) loops:

1. admit queued requests, oldest first, while the active rows stay under ``max_active_rows``;
   requests admitted together are text-encoded together (their text-encoder LoRAs per row);
2. prefetch the adapters of the requests still queued;
3. one UNet call over rows of many requests (:class:`~.scheduler.StepBatcher`);
4. batched VAE decode of the images that finished together; answer finished requests.

A request's failure (an exception in its step) fails that request only. A cancelled caller
(``asyncio`` cancellation, e.g. a client that disconnected) frees its rows before the next
step. Every accepted request is answered exactly once: by its result, its error, or
:class:`ShuttingDown` when :meth:`drain` runs out of time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..prompt import parse_prompt
from ..schedule import Schedule
from . import adapters_bridge as bridge
from . import samplers
from .metrics import Metrics
from .scheduler import ImageJob, StepBatcher

MAX_SEED = 2**32 - 1  # A1111's seed range


class RequestError(ValueError):
    """A request field is invalid; ``field`` names it (HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests already (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The server is draining or stopped and takes no new request (HTTP 503)."""


@dataclass
class GenerationRequest:
    """One txt2img request. ``prompt`` may carry ``<lora:name:te:unet>`` tags.

    ``images`` images are made with seeds ``seed, seed+1, …`` (A1111's batch semantics);
    ``seed=-1`` draws a random seed. ``sampler``/``scheduler`` use A1111's names.
    ``use_loras=False`` removes the tags without applying them (A1111's
    ``disable_extra_networks``).
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    sampler: str = samplers.DEFAULT_SAMPLER
    scheduler: str | None = None
    images: int = 1
    eta: float | None = None
    use_loras: bool = True


@dataclass
class GenerationResult:
    """Images (float32 ``[H, W, 3]`` in [0, 1]), their seeds, the adapters applied and the
    timings in seconds (``queued``, ``denoise``, ``decode``, ``total``)."""

    images: list[Any]
    seeds: list[int]
    adapters: dict[str, dict[str, float]]
    sampler: str
    timings: dict[str, float]
    adapters_were_resident: bool = False


@dataclass(eq=False)
class _Pending:
    request: GenerationRequest
    text: str
    unet: dict[str, float]
    text_encoder: dict[str, float]
    seeds: list[int]
    sampler: samplers.Sampler
    future: concurrent.futures.Future
    arrival: int
    t_submit: float
    t_admit: float = 0.0
    t_decode: float = 0.0
    jobs: list[ImageJob] = field(default_factory=list)
    images: dict[int, Any] = field(default_factory=dict)
    failed: bool = False
    was_resident: bool = False
    unet_schedule: dict[str, Schedule] = field(default_factory=dict)

    @property
    def adapter_names(self) -> list[str]:
        return sorted({*self.unet, *self.text_encoder})

    @property
    def rows(self) -> int:
        per = 2 if self.request.guidance_scale > 1.0 else 1
        return per * len(self.seeds)

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


class DiffusionServer:
    """Continuous-batching txt2img server over one patched diffusers pipeline.

    Args:
        pipe: a diffusers Stable Diffusion 1.x/2.x/XL pipeline (SDXL: pooled text embeds and
            time ids ``[h, w, 0, 0, h, w]`` per row, the SDXL pipeline's defaults). An empty
            negative prompt is encoded as the pipeline's ``negative_prompt=None`` (SDXL's
            ``force_zeros_for_empty_prompt`` then gives zeros, as diffusers does by default).
        lora_dirs: folders of LoRA files, registered by stem and ``ss_output_name``.
        max_batch_rows: most UNet rows per call (a guided image takes 2 rows).
        max_active_rows: rows in flight (admission stops above it; default ``max_batch_rows``).
        max_queue: most requests waiting for admission; beyond it :class:`QueueFull`.
        max_size, max_steps, max_images: limits on width/height, steps and images per request.
        mixed_adapters: ``False`` batches only requests with the same UNet mixture (a baseline).
        max_resident_adapters: adapters held in the banks at once (LRU eviction of those no
            request in flight uses); ``None``: no bound.
    """

    def __init__(
        self,
        pipe: Any,
        lora_dirs: Sequence[str | Path] = (),
        *,
        max_batch_rows: int = 16,
        max_active_rows: int | None = None,
        max_queue: int = 256,
        max_size: int = 1024,
        max_steps: int = 150,
        max_images: int = 16,
        mixed_adapters: bool = True,
        max_resident_adapters: int | None = None,
    ) -> None:
        if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
            raise TypeError(
                f"pipe: expected a diffusers Stable Diffusion (1.x/2.x/XL) pipeline, got "
                f"{type(pipe).__name__}"
            )
        self.pipe = pipe
        self.handle = bridge.patch(pipe, lora_dirs, max_resident_adapters)
        self.batcher = StepBatcher(
            pipe, self.handle, max_batch_rows=max_batch_rows, mixed_adapters=mixed_adapters
        )
        self.max_active_rows = max_active_rows or max_batch_rows
        self.max_queue = max_queue
        self.max_size = max_size
        self.max_steps = max_steps
        self.max_images = max_images
        self.metrics = Metrics()
        self.lock = threading.Lock()  # guards the queue and the adapter registry
        self._wake = threading.Condition(self.lock)
        self._queue: deque[_Pending] = deque()
        self._active: list[_Pending] = []
        self._arrivals = itertools.count()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> DiffusionServer:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorakernels-serve", daemon=True)
            self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting

    def drain(self, timeout: float = 30.0) -> int:
        """Refuse new requests, let queued and active ones finish for up to ``timeout`` seconds,
        answer the rest with :class:`ShuttingDown`, stop the worker. Returns how many were
        answered with that error."""
        with self.lock:
            self._accepting = False
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._thread is not None and self.in_flight():
            time.sleep(0.02)
        with self.lock:
            self._stop = True
            left = list(self._queue)
            self._queue.clear()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))
            self._thread = None
        left += self._active
        self._active = []
        for p in left:
            self._answer(p, error=ShuttingDown("server shut down before the request finished"))
        return len(left)

    close = drain

    def in_flight(self) -> int:
        """Requests queued or active."""
        with self.lock:
            return len(self._queue) + len(self._active)

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> list[bridge.AdapterInfo]:
        with self.lock:
            return [bridge.info(self.handle, n) for n in bridge.names(self.handle)]

    def refresh_adapters(self) -> list[str]:
        with self.lock:
            return bridge.refresh(self.handle)

    # ------------------------------------------------------------------ requests
    def validate(self, req: GenerationRequest) -> _Pending:
        """Check every field, resolve tags and sampler, draw the seed (no queueing)."""

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(name, msg)

        need(isinstance(req.prompt, str), "prompt", "must be a string")
        need(isinstance(req.negative_prompt, str), "negative_prompt", "must be a string")
        for name in ("steps", "width", "height", "images", "seed"):
            value = getattr(req, name)
            need(
                isinstance(value, int) and not isinstance(value, bool),
                name,
                f"must be an integer, got {value!r}",
            )
        need(1 <= req.steps <= self.max_steps, "steps", f"must be in [1, {self.max_steps}]")
        for name in ("width", "height"):
            v = getattr(req, name)
            need(v % 8 == 0 and v >= 8, name, f"must be a positive multiple of 8, got {v}")
            need(v <= self.max_size, name, f"{v} is over this server's limit {self.max_size}")
        need(
            1 <= req.images <= self.max_images,
            "batch_size",
            f"images per request must be in [1, {self.max_images}], got {req.images}",
        )
        g = req.guidance_scale
        need(isinstance(g, int | float) and math.isfinite(g), "cfg_scale", f"bad value {g!r}")
        need(-1 <= req.seed <= MAX_SEED, "seed", f"must be -1 or in [0, {MAX_SEED}]")
        try:
            sampler = samplers.resolve(req.sampler, req.scheduler)
        except ValueError as exc:
            field_name = str(exc).split(":", 1)[0]
            raise RequestError(field_name, str(exc).split(": ", 1)[1]) from None
        if req.eta is not None:
            need(isinstance(req.eta, int | float) and math.isfinite(req.eta), "eta", "bad value")
            if sampler.ancestral:
                need(req.eta == 1.0, "eta", f"only 1 (A1111's default) for {sampler.name!r}")
            elif sampler.scheduler != "DDIMScheduler":
                pass  # deterministic samplers: eta has no effect (as in A1111)
        with self.lock:
            known = bridge.spellings(self.handle)
        parsed = parse_prompt(req.prompt, known if req.use_loras else None, on_unknown="raise")
        unet = parsed.unet if req.use_loras else {}
        te = parsed.text_encoder if req.use_loras else {}
        seed = random.randint(0, MAX_SEED) if req.seed == -1 else req.seed
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(req.images)]
        return _Pending(
            request=req,
            text=parsed.text,
            unet=dict(unet),
            text_encoder=dict(te),
            unet_schedule=dict(parsed.unet_schedule) if req.use_loras else {},
            seeds=seeds,
            sampler=sampler,
            future=concurrent.futures.Future(),
            arrival=next(self._arrivals),
            t_submit=time.monotonic(),
        )

    def enqueue(self, req: GenerationRequest) -> concurrent.futures.Future:
        """Validate and queue ``req``; the future resolves to a :class:`GenerationResult`.
        Cancelling the future cancels the request."""
        pending = self.validate(req)
        with self.lock:
            if not self._accepting:
                self.metrics.inc("requests_rejected_total")
                raise ShuttingDown("the server is shutting down and accepts no new request")
            if len(self._queue) >= self.max_queue:
                self.metrics.inc("requests_rejected_total")
                raise QueueFull(
                    f"the queue holds {len(self._queue)} requests (max_queue={self.max_queue})",
                    retry_after=self._retry_after(),
                )
            self._queue.append(pending)
            self.metrics.inc("requests_total")
            self._wake.notify_all()
        return pending.future

    async def submit(self, req: GenerationRequest) -> GenerationResult:
        """Queue ``req`` and wait for its images. Cancelling the awaiting task cancels it."""
        return await asyncio.wrap_future(self.enqueue(req))

    def _retry_after(self) -> float:
        steps_s, _ = self.metrics.rates()
        queued_steps = sum(p.request.steps * len(p.seeds) for p in self._queue)
        return max(1.0, queued_steps / steps_s) if steps_s > 0 else 5.0

    def status(self) -> dict[str, float]:
        with self.lock:
            queued, active = len(self._queue), len(self._active)
            rows = sum(j.rows for p in self._active for j in p.jobs)
            pool = bridge.stats(self.handle)
        return {
            "queue_depth": queued,
            "active_requests": active,
            "active_rows": rows,
            "resident_adapters": pool["resident"],
            **{f"pool_{k}": pool[k] for k in ("hits", "misses", "evictions", "prefetched")},
        }

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self._stop and not self._queue and not self._active:
                        self._wake.wait(timeout=0.5)
                    if self._stop:
                        return
                    admitted = self._take_admissible()
                if admitted:
                    self._admit(admitted)
                self._prefetch()
                self._step_once()
        except BaseException as exc:  # a bug in the loop itself: fail everything loudly
            self._loop_error = exc
            with self.lock:
                left = list(self._queue) + self._active
                self._queue.clear()
                self._active = []
                self._accepting = False
            for p in left:
                self._answer(p, error=RuntimeError(f"server loop failed: {exc!r}"))
            raise

    def _take_admissible(self) -> list[_Pending]:
        """FIFO admission while the active rows stay under ``max_active_rows`` (at least one
        request is admitted when nothing is active, whatever its size)."""
        rows = sum(p.rows for p in self._active)
        out = []
        while self._queue:
            p = self._queue[0]
            if p.cancelled:
                self._queue.popleft()
                self.metrics.inc("requests_cancelled_total")
                continue
            if rows and rows + p.rows > self.max_active_rows:
                break
            self._queue.popleft()
            self._active.append(p)  # active from now on (no jobs until admitted): never unseen
            out.append(p)
            rows += p.rows
        return out

    def _admit(self, admitted: list[_Pending]) -> None:
        """Load adapters, encode all admitted prompts in one text-encoder batch, make jobs."""
        ok = []
        for p in admitted:
            try:
                with self.lock:
                    keep = {n for q in self._active for n in q.adapter_names}
                    p.was_resident = bridge.resident(self.handle, p.adapter_names)
                    bridge.load(self.handle, p.adapter_names, keep=keep)
                ok.append(p)
            except Exception as exc:  # noqa: BLE001 - a bad adapter file fails its request
                self._remove_active(p)
                self._answer(p, error=exc)
        # empty negative prompts are encoded as the pipeline encodes ``negative_prompt=None``
        # (SDXL may zero them): such requests form their own text-encoder batch
        for group in (
            [p for p in ok if not p.request.negative_prompt],
            [p for p in ok if p.request.negative_prompt],
        ):
            if group:
                self._start(group)

    def _start(self, ok: list[_Pending]) -> None:
        """Encode ``ok`` in one text-encoder batch and make their jobs."""
        do_cfg = any(self.batcher.do_cfg(p.request.guidance_scale) for p in ok)
        negatives = [p.request.negative_prompt for p in ok]
        try:
            embeds = bridge.encode(
                self.handle,
                [p.text for p in ok],
                negatives if any(negatives) else None,
                [p.text_encoder for p in ok],
                do_cfg,
            )
        except Exception as exc:  # noqa: BLE001
            if len(ok) == 1:
                self._remove_active(ok[0])
                self._answer(ok[0], error=exc)
                return
            for p in ok:  # isolate the request whose text fails
                self._start([p])
            return
        now = time.monotonic()
        for row, p in enumerate(ok):
            req = p.request
            try:
                p.jobs = self.batcher.make_jobs(
                    p,
                    seeds=p.seeds,
                    height=req.height,
                    width=req.width,
                    steps=req.steps,
                    guidance_scale=float(req.guidance_scale),
                    make_scheduler=lambda s=p.sampler: samplers.make_scheduler(
                        s, self.pipe.scheduler.config
                    ),
                    embeds=embeds,
                    row=row,
                    unet_mixture=p.unet,
                    unet_schedule=p.unet_schedule,
                    arrival=p.arrival,
                    eta=req.eta,
                )
            except Exception as exc:  # noqa: BLE001
                self._remove_active(p)
                self._answer(p, error=exc)
                continue
            p.t_admit = now

    def _prefetch(self) -> None:
        """Load the adapters of the next queued requests while others denoise."""
        with self.lock:
            upcoming = [n for p in itertools.islice(self._queue, 8) for n in p.adapter_names]
            if not upcoming:  # called every step: nothing queued, nothing to submit
                return
            try:
                bridge.prefetch(self.handle, list(dict.fromkeys(upcoming)))
            except Exception:  # noqa: BLE001 - the request itself reports it at admission
                pass

    def _step_once(self) -> None:
        with self.lock:
            for p in [p for p in self._active if p.cancelled]:
                self._active.remove(p)
                self.metrics.inc("requests_cancelled_total")
            jobs = [j for p in self._active for j in p.jobs if not j.done]
        picked = self.batcher.pick(jobs)
        if not picked:
            return
        out = self.batcher.step(picked)
        self.metrics.unet_call(out.rows, len(picked) - len(out.failed))
        for job, exc in out.failed:
            p = job.owner
            if not p.failed:
                p.failed = True
                with self.lock:
                    if p in self._active:
                        self._active.remove(p)
                self._answer(p, error=exc)
        finished = [j for j in out.finished if not j.owner.failed]
        if not finished:
            return
        t0 = time.monotonic()
        groups: dict[Any, list[ImageJob]] = {}
        for j in finished:
            groups.setdefault(j.group, []).append(j)
        for group in groups.values():
            try:
                images = self.batcher.decode(group)
            except Exception as exc:  # noqa: BLE001
                for j in group:
                    if not j.owner.failed:
                        j.owner.failed = True
                        self._remove_active(j.owner)
                        self._answer(j.owner, error=exc)
                continue
            for j, img in zip(group, images, strict=True):
                j.owner.images[j.index] = img
        dt = time.monotonic() - t0
        for p in {j.owner for j in finished}:
            p.t_decode += dt
            if not p.failed and len(p.images) == len(p.seeds):
                self._remove_active(p)
                self._answer(p)

    def _remove_active(self, p: _Pending) -> None:
        with self.lock:
            if p in self._active:
                self._active.remove(p)

    def _answer(self, p: _Pending, error: BaseException | None = None) -> None:
        """Resolve ``p``'s future exactly once (a cancelled future stays cancelled)."""
        now = time.monotonic()
        try:
            if error is not None:
                p.future.set_exception(error)
                self.metrics.inc("requests_failed_total")
            else:
                result = GenerationResult(
                    images=[p.images[i] for i in range(len(p.seeds))],
                    seeds=list(p.seeds),
                    adapters={"unet": dict(p.unet), "text_encoder": dict(p.text_encoder)},
                    sampler=p.sampler.name,
                    adapters_were_resident=p.was_resident,
                    timings={
                        "queued": p.t_admit - p.t_submit,
                        "denoise": now - p.t_admit - p.t_decode,
                        "decode": p.t_decode,
                        "total": now - p.t_submit,
                    },
                )
                p.future.set_result(result)
                self.metrics.images_done(len(p.seeds))
            self.metrics.request_done(now - p.t_submit)
        except concurrent.futures.InvalidStateError:
            self.metrics.inc("requests_cancelled_total")
