"""Side-by-side timing: every provider of a workload timed in the same loop, medians reported.

``time_side_by_side`` warms every callable up, picks a call count per provider so that one
sample lasts at least ``min_sample_s`` (short calls are timed in a burst, which averages out
timer resolution and per-call jitter), then takes ``repeats`` samples round-robin over the
providers, rotating the order each round so that no provider always runs right after the
same neighbour (caches, CPU frequency). Ratios between providers are therefore measured under
the same machine state, which matters on a shared machine where absolute times drift.

CPU: ``time.perf_counter``. CUDA: CUDA events around the burst, after a synchronize (the
same method as ``triton.testing.do_bench``, without its L2 flush: a layer's weights stay in
L2 across a real model's consecutive calls only for the small layers, so we report warm-L2).
The garbage collector is disabled while the samples are taken.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingConfig:
    repeats: int = 7
    warmup: int = 1
    min_sample_s: float = 0.05
    max_number: int = 1000

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.min_sample_s < 0:
            raise ValueError("timing: repeats >= 1, warmup >= 0 and min_sample_s >= 0 required")


@dataclass
class Timing:
    """Seconds per call, one value per repeat (each the mean of ``number`` calls)."""

    times: list[float]
    number: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how noisy this measurement was."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median * 1e3,
            "min_ms": self.min * 1e3,
            "times_ms": [t * 1e3 for t in self.times],
            "number": self.number,
            "spread": self.spread,
        }


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], object], number: int) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number

        return cuda_time

    def cpu_time(fn: Callable[[], object], number: int) -> float:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number

    return cpu_time


def time_side_by_side(
    fns: Mapping[str, Callable[[], object]],
    config: TimingConfig,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Time every callable of ``fns`` round-robin; returns a :class:`Timing` per name."""
    timer = _timer(torch.device(device))
    names = list(fns)
    numbers: dict[str, int] = {}
    for name in names:
        fn = fns[name]
        for _ in range(max(0, config.warmup - 1)):
            fn()
        first = timer(fn, 1) if config.warmup > 0 else 0.0
        if first <= 0:
            numbers[name] = 1
        else:
            numbers[name] = max(1, min(config.max_number, math.ceil(config.min_sample_s / first)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    was_enabled = gc.isenabled()
    gc.collect()  # once: a full collection costs ~0.2 s with torch loaded
    gc.disable()
    try:
        for rep in range(config.repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)] if names else []
            for name in order:
                samples[name].append(timer(fns[name], numbers[name]))
    finally:
        if was_enabled:
            gc.enable()
    return {n: Timing(samples[n], numbers[n]) for n in names}
