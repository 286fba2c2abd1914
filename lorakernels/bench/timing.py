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

Load (:func:`settle_load`): before a run, what other processes use *now* is read from
``/proc/stat`` over half a second (the load average lags by minutes: right after a
``pip install`` it still reads ~1 on an idle machine). If others keep at least half a CPU
busy, the run waits a few seconds for that to pass, then picks fewer torch threads than
CPUs: an OpenMP barrier waits for its slowest thread, and a thread that shares its core
with another process makes every small op wait for it (measured: the SD1.5 UNet step at
2.9x base with 2 threads on a busy 2-core machine, 1.07x a minute later).
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# A measurement whose repeats spread more than this ((max - min) / median) is flagged as noisy:
# on a quiet machine 5 repeats of these workloads spread < 10 %.
NOISY_SPREAD = 0.25
# Others using at least this many CPUs count as a busy machine.
BUSY_CPUS = 0.5


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


# ---------------------------------------------------------------------- machine load
def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cpus(interval_s: float = 0.5) -> float | None:
    """How many CPUs' worth of work other processes do now (this one sleeps meanwhile).

    ``None`` where ``/proc/stat`` is unavailable."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(interval_s)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


@dataclass
class LoadCheck:
    """What :func:`settle_load` saw and decided."""

    busy_cpus: float | None  # others' use after waiting (None: unknown)
    waited_s: float
    threads: int | None  # the torch thread count to use (None: keep the current one)
    note: str | None  # a warning for the report, only when the load matters

    def as_dict(self) -> dict:
        busy = None if self.busy_cpus is None else round(self.busy_cpus, 2)
        return {"busy_cpus": busy, "waited_s": round(self.waited_s, 1), "threads": self.threads}


def settle_load(
    max_wait_s: float, *, threads: int | None = None, poll_s: float = 1.0, verbose: bool = True
) -> LoadCheck:
    """Wait up to ``max_wait_s`` for other processes to leave the CPUs; if they stay, choose
    ``max(1, floor(CPUs - busy))`` torch threads (unless ``threads`` was given) and return a
    note saying so. A quiet machine (others < :data:`BUSY_CPUS`) gives no note."""
    t0 = time.perf_counter()
    busy = busy_cpus()
    told = False
    while busy is not None and busy >= BUSY_CPUS and time.perf_counter() - t0 < max_wait_s:
        if verbose and not told:
            print(
                f"other processes use {busy:.1f} of {os.cpu_count()} CPUs; waiting up to "
                f"{max_wait_s:.0f} s for them to finish",
                file=sys.stderr,
                flush=True,
            )
            told = True
        time.sleep(poll_s)
        busy = busy_cpus()
    waited = time.perf_counter() - t0
    if busy is None or busy < BUSY_CPUS:
        return LoadCheck(busy, waited, None, None)
    cpus = os.cpu_count() or 1
    chosen = threads
    if chosen is None:
        chosen = max(1, min(torch.get_num_threads(), math.floor(cpus - busy)))
    note = (
        f"the machine was busy: other processes used {busy:.1f} of {cpus} CPUs after "
        f"{waited:.0f} s of waiting; ran with {chosen} torch thread(s)"
        + ("" if threads is None else " (--threads)")
        + ". Ratios are noisier than on a quiet machine; rows marked ! spread widely"
    )
    return LoadCheck(busy, waited, chosen, note)
