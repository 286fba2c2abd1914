"""The CPU GEMM of the cpu backend: torch's, or oneDNN's with a prepacked weight, by measurement.

``y = x @ W.T + b`` (``x [M, K]``, ``W [N, K]``) runs either through torch (``addmm``, which
calls MKL's ``sgemm`` for float32 and oneDNN for bf16/fp16 on CPU) or through oneDNN with
``W`` reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, the pair Inductor's CPU weight freezing emits). The calibration times
both per precision on first use (:func:`speedup`) and the cpu backend takes oneDNN for a
layer's own ``W`` only where it measured at least :data:`MIN_SPEEDUP` (1.25) times faster (a
packed copy of ``W`` costs memory), and for merged weights wherever it measured faster at all
(:data:`MIN_SPEEDUP_MERGED`: a merged weight is a copy made anyway, packing it costs nothing).

Why: on a 2-core AMD EPYC (family 26, AVX-512), torch 2.13, 2 threads, float32:
``F.linear`` 74 ms against 32 ms prepacked at (4096, 1280, 1280), 3.5 vs 1.4 ms at
(1232, 768, 320), 0.47 vs 0.19 ms at (154, 768, 320) (medians of 30): torch's float32 GEMM
ran at ~170 GFLOP/s there and oneDNN's at ~410. bf16 already goes to oneDNN through torch,
prepacking gained 5-15 % at mid-size shapes, but far more on short row runs with a bias: sixteen
77-row runs at (768, 320) with a bias took 1.62x one ``F.linear`` over all 1232 rows through
torch, 1.06x through oneDNN with packed weights (torch's bf16 ``addmm`` pays its bias per call).
A CPU where MKL is the faster float32 GEMM keeps torch's.

Numerics: both accumulate in the input dtype's accumulator (float32 for float32 and half
inputs) and round once; they differ only in summation order (~1e-7 of ``|x|·|W|`` rows in
float32).

The packed ``W`` of a layer is a copy (``K·N`` elements): :data:`PACKED` keeps one per layer
and dtype, bounded by ``LORAKERNELS_PACKED_MB`` (default 4096: SD1.5's patched float32
layers took 924 MB) apart from the merged weights' budget, so neither evicts the other (when
they shared one budget a kohya rank-32 UNet at 32² rebuilt 504 merged 640x640 weights in
four steps instead of 320). A layer whose packed ``W`` does not fit runs torch's GEMM: never
a repack per call (2 ms at 320x320, as long as the GEMM itself). Merged weights are packed
once when built and cached with the merged weights (lorakernels.plan). oneDNN's op has no
autograd formula, so it runs only where no gradient is recorded.

``LORAKERNELS_CPU_GEMM``: ``auto`` (default, by measurement), ``torch`` or ``onednn`` (an
error where this torch build has no oneDNN: an explicit choice never falls back).
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import torch
from torch import Tensor

__all__ = [
    "IMPLS",
    "MIN_SPEEDUP",
    "MIN_SPEEDUP_MERGED",
    "PACKED",
    "PackedWeights",
    "available",
    "choice",
    "linear",
    "linear_add",
    "pack",
    "speedup",
]

IMPLS = ("auto", "torch", "onednn")
# oneDNN only where it clearly wins: the probe is one shape, a packed weight costs K·N words,
# and prepacked bf16 measured 1.04x and 1.16x torch's in two calibrations on one EPYC (a
# threshold inside that noise would flip the choice between runs); float32 there: 2.3x
MIN_SPEEDUP = 1.25
# merged weights: any measured gain (their packed form replaces the plain one, no extra bytes)
MIN_SPEEDUP_MERGED = 1.0


def available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU wheels from PyPI do)."""
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def requested() -> str:
    """``LORAKERNELS_CPU_GEMM`` (``auto`` when unset); ``ValueError`` naming it when invalid."""
    env = os.environ.get("LORAKERNELS_CPU_GEMM", "auto") or "auto"
    if env not in IMPLS:
        raise ValueError(
            f"LORAKERNELS_CPU_GEMM: unknown CPU GEMM {env!r}; choose one of {', '.join(IMPLS)}"
        )
    if env == "onednn" and not available():
        raise RuntimeError(
            "LORAKERNELS_CPU_GEMM=onednn, but this torch build has no oneDNN prepacked linear "
            "(torch.backends.mkldnn.is_available() is False)"
        )
    return env


def choice(speedups: dict[str, float], prec: str, merged: bool = False) -> str:
    """``"onednn"`` or ``"torch"`` for GEMMs in precision ``prec`` (``"fp32"``, ``"bf16"``,
    ``"fp16"``): the environment variable, else the calibration's measured ``speedups``
    (torch's time / oneDNN's, per precision) against :data:`MIN_SPEEDUP`, or
    :data:`MIN_SPEEDUP_MERGED` for ``merged`` weights (built and packed once, cached as the
    packed form). Other precisions (float64) always use torch; a speed-up of 0 (oneDNN
    unavailable or not measured) is below both bars."""
    if prec not in ("fp32", "bf16", "fp16"):
        return "torch"
    env = requested()
    if env != "auto":
        return env
    bar = MIN_SPEEDUP_MERGED if merged else MIN_SPEEDUP
    return "onednn" if speedups.get(prec, 0.0) >= bar else "torch"


def pack(w: Tensor) -> Tensor:
    """``W [N, K]`` reordered into oneDNN's layout for :func:`linear` (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W.T + bias`` with ``packed = pack(W)``; ``x [M, K]``, a new ``[M, N]`` tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_add(x: Tensor, packed: Tensor, other: Tensor) -> Tensor:
    """``x @ W.T + other`` (``other [M, N]`` added in the GEMM's epilogue: no extra pass)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "add")


def speedup(dtype: torch.dtype, best_time) -> float:
    """torch's time over oneDNN's (prepacked) for one mid-size GEMM in ``dtype``, the faster
    of two row counts each (0.0 where oneDNN is unavailable). ``best_time(fn, reps)``: the
    calibration's timer. ~0.1 s on 2 cores."""
    if not available():
        return 0.0
    gen = torch.Generator().manual_seed(3)
    k = n = 640
    x = torch.randn(1024, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    y = torch.empty(1024, n, dtype=dtype)
    try:
        pw = pack(w)
    except RuntimeError:
        return 0.0
    ratios = []
    for m in (256, 1024):
        t_torch = best_time(lambda m=m: torch.mm(x[:m], w.T, out=y[:m]), 5)
        t_onednn = best_time(lambda m=m: linear(x[:m], pw, None), 5)
        ratios.append(t_torch / max(t_onednn, 1e-9))
    return min(ratios)


class PackedWeights:
    """Per layer and dtype, the layer's ``W`` packed by :func:`pack`; bounded in bytes.

    Keyed by the layer's anchor (a tensor that lives as long as the layer, the bank's
    ``lora_a``: a layer's ``W`` may reach the backend as a fresh view each call) and never
    stale: an entry is rebuilt when ``W``'s data pointer, shape, strides, dtype or version
    counter moved (an in-place edit or a replaced parameter), and dropped with its anchor.
    :meth:`get` returns ``None`` when a new entry would pass the budget (the caller then runs
    torch's GEMM); room is never made by evicting another layer's entry (a cycle of layers
    larger than the budget would evict every entry before its reuse).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.bytes = 0
        self.refused = 0
        self.packs = 0
        self._entries: dict[tuple, tuple] = {}  # (id(anchor), dtype) -> (stamp, packed, ref)
        self._lock = threading.RLock()  # a weakref callback may run inside get()

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: tuple) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self.bytes -= e[1].numel() * e[1].element_size()

    def get(self, anchor: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor | None:
        """``weight`` in ``dtype``, packed; ``None`` when it does not fit the budget."""
        key = (id(anchor), dtype)
        stamp = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype)
        stamp += (weight._version,)
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e[0] == stamp and e[2]() is anchor:
                return e[1]
            if e is not None:
                self._drop(key)
            size = weight.numel() * torch.empty((), dtype=dtype).element_size()
            if self.bytes + size > self.budget:
                self.refused += 1
                return None

            def gone(_ref, key=key) -> None:
                with self._lock:
                    cur = self._entries.get(key)
                    if cur is not None and cur[2] is _ref:
                        self._drop(key)

            packed = pack(weight.to(dtype))
            self._entries[key] = (stamp, packed, weakref.ref(anchor, gone))
            self.bytes += packed.numel() * packed.element_size()
            self.packs += 1
            return packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def _packed_budget() -> int:
    mb = os.environ.get("LORAKERNELS_PACKED_MB")
    if not mb:
        return 4 * 2**30
    try:
        return int(float(mb) * 2**20)
    except ValueError:
        raise ValueError(f"LORAKERNELS_PACKED_MB must be a number, got {mb!r}") from None


PACKED = PackedWeights(_packed_budget())
