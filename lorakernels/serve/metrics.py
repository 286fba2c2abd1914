"""Server metrics in Prometheus' text format (no dependency: counters, gauges, histograms).

Rates (steps/s, images/s) are also kept as gauges over a sliding window, for people reading
``/metrics`` by eye; Prometheus users take ``rate()`` of the ``_total`` counters instead.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

PREFIX = "lorakernels_serve_"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    """Thread-safe counters of one server; :meth:`render` gives the exposition text."""

    WINDOW_S = 30.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, float] = {
            "requests_total": 0,
            "requests_failed_total": 0,
            "requests_cancelled_total": 0,
            "requests_rejected_total": 0,
            "unet_calls_total": 0,
            "unet_rows_total": 0,
            "image_steps_total": 0,
            "images_total": 0,
        }
        self.latency = Histogram(LATENCY_BUCKETS)
        self.rows_per_call = Histogram(ROW_BUCKETS)
        self._events: deque[tuple[float, int, int]] = deque()  # (time, image steps, images)

    def inc(self, name: str, by: float = 1) -> None:
        with self.lock:
            self.counters[name] += by

    def unet_call(self, rows: int, image_steps: int) -> None:
        with self.lock:
            self.counters["unet_calls_total"] += 1
            self.counters["unet_rows_total"] += rows
            self.counters["image_steps_total"] += image_steps
            self.rows_per_call.observe(rows)
            self._events.append((time.monotonic(), image_steps, 0))
            self._trim()

    def images_done(self, n: int) -> None:
        with self.lock:
            self.counters["images_total"] += n
            self._events.append((time.monotonic(), 0, n))
            self._trim()

    def _trim(self) -> None:
        """Drop events older than the window (caller holds the lock): memory stays bounded
        even when nobody reads the rates."""
        horizon = time.monotonic() - self.WINDOW_S
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()

    def request_done(self, seconds: float) -> None:
        with self.lock:
            self.latency.observe(seconds)

    def rates(self) -> tuple[float, float]:
        """(image steps/s, images/s) over the last :attr:`WINDOW_S` seconds."""
        with self.lock:
            self._trim()
            steps = sum(e[1] for e in self._events)
            images = sum(e[2] for e in self._events)
        return steps / self.WINDOW_S, images / self.WINDOW_S

    def render(self, gauges: dict[str, float]) -> str:
        steps_s, images_s = self.rates()
        gauges = {**gauges, "steps_per_second": steps_s, "images_per_second": images_s}
        lines = []
        with self.lock:
            for name, value in self.counters.items():
                lines += [f"# TYPE {PREFIX}{name} counter", f"{PREFIX}{name} {value:g}"]
            for name, h in (
                ("request_latency_seconds", self.latency),
                ("rows_per_unet_call", self.rows_per_call),
            ):
                lines.append(f"# TYPE {PREFIX}{name} histogram")
                lines += h.lines(PREFIX + name)
        for name, value in gauges.items():
            lines += [f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name} {value:g}"]
        return "\n".join(lines) + "\n"
