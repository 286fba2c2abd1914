"""Step-level continuous batching: many images at different timesteps in one UNet call.

Unit of work: an :class:`ImageJob` (one image of one request). It owns its latents
``[1, C, h, w]``, its scheduler instance and step index, its generator (initial noise and, for
ancestral samplers, every step's noise, so its image does not depend on its batch-mates), its
text embeddings and its UNet mixture. With guidance it puts two rows in a UNet call
(``[uncond, cond]``, both with the request's UNet mixture, as ``generate`` does), else one.

One UNet call (:meth:`StepBatcher.step`) takes the rows of the jobs :meth:`StepBatcher.pick`
chose, with one timestep per row (``UNet2DConditionModel`` takes a 1-D ``timestep`` of batch
size) and one LoRA mixture per row: a request with a strength schedule
(``<lora:x:0@0,1@0.5>``) gets its strengths at its own step. Each job's ``scale_model_input``
and ``step`` run on its own rows, so per-image semantics equal diffusers' pipeline loop for
that image alone:

    x = scheduler.scale_model_input(latents, t)
    eps_u, eps_c = unet([x, x], [t, t], [uncond, cond], mixtures=[mix, mix])
    latents = scheduler.step(eps_u + g * (eps_c - eps_u), t, latents, generator=gen)

Fairness: every call serves the jobs that were stepped least recently first (ties: arrival
order), filling up to ``max_batch_rows`` with jobs of the same (height, width, dtype) group as
the first one. So active jobs advance round-robin at equal rates, a short request finishes
after its own few steps, and a resolution group waits at most until its jobs are the oldest.
Admission (in the server) is FIFO by arrival.

Not used here: the integration's cross-attention K/V output cache, which assumes one fixed
batch for a whole generation; rows here change every step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..schedule import Schedule, mixture_at, scheduler_sigma
from . import adapters_bridge as bridge

GroupKey = tuple[int, int, torch.dtype]


@dataclass(eq=False)
class ImageJob:
    """One image in flight (see the module docstring). ``owner`` is the server's request."""

    owner: Any
    index: int
    seed: int
    generator: torch.Generator
    scheduler: Any
    timesteps: Tensor
    latents: Tensor  # [1, C, h, w]
    cond: Tensor  # [1, T, D]
    uncond: Tensor | None  # [1, T, D] with guidance, else None
    added_cond: dict[str, Tensor] | None  # SDXL: text_embeds / time_ids, rows as the UNet's
    guidance_scale: float
    unet_mixture: dict[str, float]
    group: GroupKey
    adapter_key: tuple[tuple[str, float], ...]
    arrival: int
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    step_index: int = 0
    last_tick: int = -1
    unet_schedule: dict[str, Schedule] = field(default_factory=dict)

    def mixture(self) -> dict[str, float]:
        """The UNet mixture at this job's current step: scheduled adapters at their strength
        for ``step_index`` of ``len(timesteps)`` (sigma from its own scheduler)."""
        if not self.unet_schedule:
            return self.unet_mixture
        step = self.step_index
        sigma = scheduler_sigma(self.scheduler, step)
        return mixture_at(
            self.unet_mixture, self.unet_schedule, step, len(self.timesteps), sigma, "prompt"
        )

    @property
    def rows(self) -> int:
        return 1 if self.uncond is None else 2

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)


@dataclass
class StepOutcome:
    """What one :meth:`StepBatcher.step` did: rows run, jobs finished, jobs failed."""

    rows: int
    finished: list[ImageJob]
    failed: list[tuple[ImageJob, BaseException]]


class StepBatcher:
    """Runs UNet calls over rows of many jobs for one patched pipeline (worker thread only).

    Args:
        pipe: a diffusers SD pipeline patched through :mod:`.adapters_bridge`.
        handle: the integration handle.
        max_batch_rows: most UNet rows per call (a guided image takes 2).
        mixed_adapters: ``False`` restricts a call to jobs with the same UNet mixture (the
            "batch only requests sharing an adapter" baseline of the benchmarks).
    """

    def __init__(
        self, pipe: Any, handle: Any, *, max_batch_rows: int = 16, mixed_adapters: bool = True
    ):
        if max_batch_rows < 2:
            raise ValueError(f"max_batch_rows must be >= 2 (a guided image), got {max_batch_rows}")
        self.pipe = pipe
        self.handle = handle
        self.unet = pipe.unet
        self.max_batch_rows = max_batch_rows
        self.mixed_adapters = mixed_adapters
        self.tick = 0

    # ------------------------------------------------------------------ job creation
    def make_jobs(
        self,
        owner: Any,
        *,
        seeds: Sequence[int],
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        make_scheduler: Callable[[], Any],
        embeds: dict[str, Tensor],
        row: int,
        unet_mixture: dict[str, float],
        arrival: int,
        eta: float | None,
        unet_schedule: dict[str, Schedule] | None = None,
    ) -> list[ImageJob]:
        """One job per seed, latents drawn as ``pipe.prepare_latents`` draws them for one image
        with ``torch.Generator().manual_seed(seed)``. ``embeds`` is the batched encoder output;
        ``row`` this request's row in it."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        cond = embeds["prompt_embeds"][row : row + 1]
        do_cfg = self.do_cfg(guidance_scale)
        uncond = embeds["negative_prompt_embeds"][row : row + 1] if do_cfg else None
        device = cond.device
        added = self._added_cond(embeds, row, height, width, do_cfg, cond.dtype)
        shape = (
            1,
            self.unet.config.in_channels,
            height // pipe.vae_scale_factor,
            width // pipe.vae_scale_factor,
        )
        schedule = dict(unet_schedule or {})
        key = (*sorted(unet_mixture.items()), *sorted(schedule.items()))
        jobs = []
        for i, seed in enumerate(seeds):
            sched = make_scheduler()
            sched.set_timesteps(steps, device=device)
            gen = torch.Generator().manual_seed(seed)
            latents = randn_tensor(shape, generator=gen, device=device, dtype=cond.dtype)
            latents = latents * sched.init_noise_sigma
            params = inspect.signature(sched.step).parameters
            kwargs: dict[str, Any] = {}
            if "eta" in params:
                kwargs["eta"] = 0.0 if eta is None else eta
            if "generator" in params:
                kwargs["generator"] = gen
            jobs.append(
                ImageJob(
                    owner=owner,
                    index=i,
                    seed=seed,
                    generator=gen,
                    scheduler=sched,
                    timesteps=sched.timesteps,
                    latents=latents,
                    cond=cond,
                    uncond=uncond,
                    added_cond=added,
                    guidance_scale=guidance_scale,
                    unet_mixture=dict(unet_mixture),
                    group=(height, width, cond.dtype),
                    adapter_key=key,
                    arrival=arrival,
                    step_kwargs=kwargs,
                    unet_schedule=schedule,
                )
            )
        return jobs

    def do_cfg(self, guidance_scale: float) -> bool:
        """Guidance doubles the rows exactly when the pipeline would (scale > 1, no LCM)."""
        return (
            guidance_scale > 1.0 and getattr(self.unet.config, "time_cond_proj_dim", None) is None
        )

    def _added_cond(self, embeds, row, height, width, do_cfg, dtype):
        """SDXL's added conditioning: pooled text embeds and time ids (original = target size,
        no crop), ``[uncond, cond]`` rows as the SDXL pipeline builds them."""
        if "pooled_prompt_embeds" not in embeds:
            return None
        pooled = embeds["pooled_prompt_embeds"][row : row + 1]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
        time_ids = time_ids.to(pooled.device)
        if do_cfg:
            neg = embeds["negative_pooled_prompt_embeds"][row : row + 1]
            return {"text_embeds": torch.cat([neg, pooled]), "time_ids": time_ids.repeat(2, 1)}
        return {"text_embeds": pooled, "time_ids": time_ids}

    # ------------------------------------------------------------------ one UNet call
    def pick(self, jobs: Sequence[ImageJob]) -> list[ImageJob]:
        """The next call's jobs: least recently stepped first, one group, up to the row cap."""
        if not jobs:
            return []
        order = sorted(jobs, key=lambda j: (j.last_tick, j.arrival, j.index))
        first = order[0]
        chosen, rows = [], 0
        for job in order:
            if job.group != first.group:
                continue
            if not self.mixed_adapters and job.adapter_key != first.adapter_key:
                continue
            if rows + job.rows > self.max_batch_rows:
                continue
            chosen.append(job)
            rows += job.rows
        return chosen

    def step(self, jobs: Sequence[ImageJob]) -> StepOutcome:
        """One UNet call over ``jobs`` (then each job's scheduler step). A failing call is
        retried job by job so that only the job that raises fails."""
        self.tick += 1
        try:
            eps = self._unet(jobs)
        except Exception:
            if len(jobs) == 1:
                raise
            finished, failed, rows = [], [], 0
            for job in jobs:
                try:
                    out = self.step([job])
                except Exception as exc:  # noqa: BLE001 - the job fails, the loop goes on
                    failed.append((job, exc))
                    continue
                finished += out.finished
                failed += out.failed
                rows += out.rows
            return StepOutcome(rows, finished, failed)
        finished, failed = [], []
        start = 0
        for job in jobs:
            part = eps[start : start + job.rows]
            start += job.rows
            try:
                self._advance(job, part)
            except Exception as exc:  # noqa: BLE001 - one request's fault stays its own
                failed.append((job, exc))
                continue
            if job.done:
                finished.append(job)
        return StepOutcome(sum(j.rows for j in jobs), finished, failed)

    def _unet(self, jobs: Sequence[ImageJob]) -> Tensor:
        xs, ts, ctx, mixes, added = [], [], [], [], []
        for job in jobs:
            t = job.timesteps[job.step_index]
            x = job.scheduler.scale_model_input(job.latents, t)
            if job.uncond is not None:
                xs += [x, x]
                ctx += [job.uncond, job.cond]
            else:
                xs.append(x)
                ctx.append(job.cond)
            # float32 timesteps: the UNet's sinusoidal embedding casts to float anyway, so an
            # integer DDIM timestep and a float Euler one can share the call unchanged
            ts.append(t.to(torch.float32).reshape(1).expand(job.rows))
            mixes += [job.mixture()] * job.rows
            if job.added_cond is not None:
                added.append(job.added_cond)
        kwargs: dict[str, Any] = {}
        if added:
            kwargs["added_cond_kwargs"] = {
                k: torch.cat([a[k] for a in added]) for k in ("text_embeds", "time_ids")
            }
        with torch.no_grad(), bridge.unet_mixtures(self.handle, mixes):
            return self.unet(
                torch.cat(xs),
                torch.cat(ts).to(xs[0].device),
                encoder_hidden_states=torch.cat(ctx),
                return_dict=False,
                **kwargs,
            )[0]

    def _advance(self, job: ImageJob, eps: Tensor) -> None:
        t = job.timesteps[job.step_index]
        if job.uncond is not None:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + job.guidance_scale * (eps_c - eps_u)
        with torch.no_grad():
            out = job.scheduler.step(eps, t, job.latents, **job.step_kwargs, return_dict=False)
        job.latents = out[0]
        job.step_index += 1
        job.last_tick = self.tick

    # ------------------------------------------------------------------ decoding
    def decode(self, jobs: Sequence[ImageJob]) -> list[Any]:
        """Batched VAE decode of finished jobs of one group -> float ``[H, W, 3]`` arrays in
        [0, 1], as the pipeline's ``output_type="np"`` gives them."""
        vae = self.pipe.vae
        latents = torch.cat([j.latents for j in jobs])
        with torch.no_grad():
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        arr = self.pipe.image_processor.postprocess(
            image, output_type="np", do_denormalize=[True] * len(jobs)
        )
        return list(arr)
