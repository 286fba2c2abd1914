"""Strength schedules inside one diffusers pipeline call: new UNet strengths at every step.

:meth:`~lorakernels.integrations.diffusers.DiffusersLoRA.generate` opens one UNet ``use()``
block for the whole call with every scheduled adapter in it (strength 0 where the schedule
starts at 0, which holds the adapter resident without computing it). This module then keeps
the block's batch current:

* the pipeline's ``callback_on_step_end`` (diffusers calls it after loop iteration ``i``)
  moves the step counter to ``i + 1``;
* a forward pre-hook on the UNet evaluates every prompt's schedules at the current step, with
  ``N = len(scheduler.timesteps)`` loop steps and ``sigma = scheduler.sigmas[step]`` where the
  scheduler has sigmas, and rewrites the batch in place (:meth:`lorakernels.MultiLoRA.refill`)
  when a strength changed.

The batch tensors keep their identity, so nothing recompiles under ``torch.compile`` and a
captured CUDA graph stays valid. Each rewrite bumps the batch version, which invalidates the
cross-attention K/V cache (its outputs depend on the strengths). A strength that changes is a
new mixture for :mod:`lorakernels.plan`: its group runs unmerged until the same strength has
recurred long enough to pay for a merged weight.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ..schedule import Schedule, mixture_at, scheduler_sigma


class StepStrengths:
    """Per-step UNet mixtures of one ``generate`` call.

    Args:
        pipe: the diffusers pipeline (its ``scheduler`` and ``unet``).
        manager: the UNet's :class:`~lorakernels.MultiLoRA`.
        base: one ``{adapter: strength}`` per prompt, the constant UNet strengths.
        schedules: one ``{adapter: schedule}`` per prompt (canonical names).
        expand: per-prompt mixtures -> the UNet batch's (images per prompt, guidance halves).

    Raises ``TypeError`` for a pipeline without ``callback_on_step_end`` (schedules need it
    to know the step), before the call encodes or loads anything.
    """

    def __init__(
        self,
        pipe: Any,
        manager: Any,
        base: Sequence[Mapping[str, float]],
        schedules: Sequence[Mapping[str, Schedule]],
        expand: Callable[[list[dict[str, float]]], list[dict[str, float]]],
    ) -> None:
        if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
            raise TypeError(
                f"lora_schedules: {type(pipe).__name__} takes no callback_on_step_end, "
                "which schedules need to know the step"
            )
        self.pipe = pipe
        self.manager = manager
        self.base = [dict(b) for b in base]
        self.schedules = [dict(s) for s in schedules]
        self.expand = expand
        self.step = 0
        self.batch = None
        self._applied: list[dict[str, float]] | None = None
        self._thread: int | None = None  # the thread running the pipeline (set by running)

    def initial(self) -> list[dict[str, float]]:
        """The UNet batch's mixtures to open the ``use()`` block with: every scheduled
        adapter present at strength 0, which holds it without computing it (the pre-hook sets
        the step-0 strengths before the first UNet call, when the step count and sigma are
        known; schedules are not called before that)."""
        return self.expand(
            [{**b, **dict.fromkeys(s, 0.0)} for b, s in zip(self.base, self.schedules, strict=True)]
        )

    def _prompt_mixtures(self, step: int, num_steps: int, sigma: float | None) -> list[dict]:
        return [
            mixture_at(b, s, step, num_steps, sigma, f"lora_schedules[{i}]")
            for i, (b, s) in enumerate(zip(self.base, self.schedules, strict=True))
        ]

    def before_unet(self, module: Any, args: Any) -> None:
        """Forward pre-hook: the batch gets this step's strengths (rewritten only on change).
        A call of the same UNet from another thread (a server worker sharing the model) leaves
        this batch alone; one pipeline object itself is not thread-safe (its scheduler)."""
        if threading.get_ident() != self._thread:
            return
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)  # None before set_timesteps
        num_steps = len(timesteps) if timesteps is not None else 1
        sigma = scheduler_sigma(self.pipe.scheduler, self.step)
        mixes = self.expand(self._prompt_mixtures(self.step, num_steps, sigma))
        if mixes != self._applied:
            self.manager.refill(self.batch, mixes)
            self._applied = mixes

    def on_step_end(self, step: int) -> None:
        """The pipeline finished loop iteration ``step``: the next UNet call is ``step + 1``."""
        self.step = step + 1

    @contextmanager
    def running(self, batch: Any, pipe_kwargs: dict[str, Any]):
        """Inside the block the UNet's calls see per-step strengths; ``pipe_kwargs`` gets a
        ``callback_on_step_end`` that chains the caller's own (called after ours)."""
        self.batch = batch
        self._thread = threading.get_ident()
        user = pipe_kwargs.get("callback_on_step_end")

        def callback(pipe, step, timestep, callback_kwargs):
            self.on_step_end(step)
            if user is None:
                return callback_kwargs
            return user(pipe, step, timestep, callback_kwargs)

        pipe_kwargs["callback_on_step_end"] = callback
        if user is not None and hasattr(user, "tensor_inputs"):
            # diffusers reads a PipelineCallback's tensor_inputs only from the object itself
            pipe_kwargs.setdefault("callback_on_step_end_tensor_inputs", user.tensor_inputs)
        hook = self.pipe.unet.register_forward_pre_hook(self.before_unet)
        try:
            yield
        finally:
            hook.remove()
