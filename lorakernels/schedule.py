"""Strength schedules: a LoRA's UNet strength as a function of the denoising step.

A *schedule* gives one adapter's UNet strength at each step of one prompt's denoising loop.
Accepted forms (:data:`Schedule`):

* a number: the same strength at every step;
* a sequence of numbers: one strength per step. A list whose length differs from the loop's
  step count is stretched over the run (step ``i`` of ``N`` reads entry ``i * len // N``), so
  20 values fit a 20-step request whatever the sampler does (PNDM runs 21 UNet steps for 20);
* a callable ``fn(step, sigma) -> float``: ``step`` is the 0-based loop index, ``sigma`` the
  scheduler's noise level at that step (``None`` for schedulers without ``sigmas``);
* :class:`Keyframes`, what the prompt syntax builds (``<lora:name:0.2@0,1@0.5>``);
* :class:`Summed`, the sum of several of the above (an adapter tagged twice in one prompt).

Keyframe positions (``W@P``): ``P < 1`` is a fraction of the run (``0.5`` = halfway, step
``0.5 * N``), ``P >= 1`` a 0-based step index (``@10`` = the eleventh step). Between two
keyframes the strength is interpolated linearly in steps; before the first and after the last
it holds their values. ``start``/``stop`` (same position rule) switch the strength off before
``start`` and from ``stop`` on. Every strength must be finite (``ValueError`` naming where).

Evaluation: :func:`strength_at`. Only the UNet strength is scheduled: the text encoder runs
once per prompt, with the schedule's value at step 0. How strengths reach the layers without
recompiles and what the planner does with them: :mod:`lorakernels.integrations.diffusers`
(``generate(..., lora_schedules=)``) and :mod:`lorakernels.plan` (a changing strength is a new
mixture, so its group stays unmerged unless the same strength recurs long enough to pay for a
merged weight).

Stdlib only (the prompt parser imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Keyframes",
    "Schedule",
    "Summed",
    "check_schedule",
    "mixture_at",
    "position",
    "scheduler_sigma",
    "strength_at",
]


def position(p: float, num_steps: int) -> float:
    """A keyframe position in steps: ``p * num_steps`` for ``p < 1``, else ``p``."""
    return p * num_steps if p < 1 else p


@dataclass(frozen=True)
class Keyframes:
    """Strength keyframes ``((position, strength), ...)`` and an optional active window.

    ``points`` are kept as written (positions resolve per run, see the module docstring).
    """

    points: tuple[tuple[float, float], ...]
    start: float | None = None
    stop: float | None = None

    def at(self, step: int, num_steps: int) -> float:
        """The strength at 0-based ``step`` of a ``num_steps``-step run."""
        if self.start is not None and step < position(self.start, num_steps):
            return 0.0
        if self.stop is not None and step >= position(self.stop, num_steps):
            return 0.0
        pts = sorted(((position(p, num_steps), w) for p, w in self.points), key=lambda t: t[0])
        if step <= pts[0][0]:
            return pts[0][1]
        for (p0, w0), (p1, w1) in zip(pts, pts[1:], strict=False):
            if step <= p1:
                return w0 + (w1 - w0) * (step - p0) / (p1 - p0) if p1 > p0 else w1
        return pts[-1][1]


@dataclass(frozen=True)
class Summed:
    """The sum of several schedules (one adapter tagged more than once in a prompt)."""

    terms: tuple[Schedule, ...]


Schedule = float | Sequence[float] | Callable[[int, float | None], float] | Keyframes | Summed


def check_schedule(schedule: object, where: str) -> Schedule:
    """``schedule`` if it is one of the accepted forms, else ``TypeError``/``ValueError``
    naming ``where``. Numbers and lists are checked to be finite here; callables when they
    run (:func:`strength_at`)."""
    if isinstance(schedule, bool):
        raise TypeError(f"{where}: a strength schedule cannot be a bool")
    if isinstance(schedule, int | float):
        _finite(float(schedule), where)
        return float(schedule)
    if isinstance(schedule, Keyframes):
        if not schedule.points:
            raise ValueError(f"{where}: keyframes need at least one strength")
        for _, w in schedule.points:
            _finite(w, where)
        return schedule
    if isinstance(schedule, Summed):
        for i, t in enumerate(schedule.terms):
            check_schedule(t, f"{where} term {i}")
        return schedule
    if callable(schedule):
        return schedule
    if isinstance(schedule, Sequence) and not isinstance(schedule, str | bytes):
        if not schedule:
            raise ValueError(f"{where}: a per-step strength list must not be empty")
        out = []
        for i, w in enumerate(schedule):
            if isinstance(w, bool) or not isinstance(w, int | float):
                raise TypeError(f"{where}[{i}]: strengths must be numbers, got {w!r}")
            out.append(_finite(float(w), f"{where}[{i}]"))
        return tuple(out)
    raise TypeError(
        f"{where}: expected a number, a list of per-step strengths or a callable "
        f"(step, sigma) -> strength, got {type(schedule).__name__}"
    )


def strength_at(
    schedule: Schedule, step: int, num_steps: int, sigma: float | None, where: str
) -> float:
    """The strength ``schedule`` gives at 0-based ``step`` of a ``num_steps``-step run whose
    scheduler is at noise level ``sigma`` (``None`` when it has none)."""
    if isinstance(schedule, int | float):
        return float(schedule)
    if isinstance(schedule, Keyframes):
        return schedule.at(step, num_steps)
    if isinstance(schedule, Summed):
        return sum(strength_at(t, step, num_steps, sigma, where) for t in schedule.terms)
    if callable(schedule):
        try:
            w = schedule(step, sigma)
        except Exception as exc:
            raise ValueError(f"{where}: the schedule raised at step {step}: {exc!r}") from exc
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise TypeError(f"{where}: the schedule returned {w!r} at step {step}, not a number")
        return _finite(float(w), f"{where} at step {step}")
    values = schedule
    return float(values[min(len(values) - 1, step * len(values) // max(num_steps, 1))])


def scheduler_sigma(scheduler: object, step: int) -> float | None:
    """The noise level a diffusers scheduler runs step ``step`` at (``scheduler.sigmas``),
    ``None`` for schedulers without sigmas (DDIM, PNDM) or past their end."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or step >= len(sigmas):
        return None
    return float(sigmas[step])


def mixture_at(
    base: Mapping[str, float],
    schedules: Mapping[str, Schedule],
    step: int,
    num_steps: int,
    sigma: float | None,
    where: str,
) -> dict[str, float]:
    """``base`` (constant strengths) with every scheduled adapter at its strength for ``step``.

    Scheduled adapters stay in the result at strength 0 where the schedule is 0, so a caller
    that sizes its batch or holds adapters by the keys keeps them for the steps that use them.
    """
    out = dict(base)
    for name, sched in schedules.items():
        out[name] = strength_at(sched, step, num_steps, sigma, f"{where}[{name!r}]")
    return out


def _finite(w: float, where: str) -> float:
    if not math.isfinite(w):
        raise ValueError(f"{where}: strength must be finite, got {w}")
    return w
