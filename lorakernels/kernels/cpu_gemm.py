"""The CPU GEMM of the cpu backend: torch's, or oneDNN's with a prepacked weight, by measurement.

``y = x @ W.T + b`` (``x [M, K]``, ``W [N, K]``) runs either through torch (``addmm``, which
calls MKL's ``sgemm`` for float32 and oneDNN for bf16/fp16 on CPU) or through oneDNN with
``W`` reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, the pair Inductor's CPU weight freezing emits). The calibration times
both per precision on first use (:func:`speedup`) and the cpu backend takes oneDNN only where
it measured at least :data:`MIN_SPEEDUP` times faster.

Why: on a 2-core AMD EPYC (family 26, AVX-512), torch 2.13, 2 threads, float32:
``F.linear`` 74 ms against 32 ms prepacked at (4096, 1280, 1280), 3.5 vs 1.4 ms at
(1232, 768, 320), 0.47 vs 0.19 ms at (154, 768, 320) (medians of 30): torch's float32 GEMM
ran at ~170 GFLOP/s there and oneDNN's at ~410. bf16 already goes to oneDNN through torch,
prepacking gained 5-15 %. A CPU where MKL is the faster float32 GEMM keeps torch's.

Numerics: both accumulate in the input dtype's accumulator (float32 for float32 and half
inputs) and round once; they differ only in summation order (~1e-7 of ``|x|·|W|`` rows in
float32). The packed weight is a copy (``K·N`` elements, the dtype's size): the cpu backend
keeps it in the merged-weight cache, which bounds its bytes and drops it when ``W`` changes.
oneDNN's op has no autograd formula, so it runs only where no gradient is recorded.

``LORAKERNELS_CPU_GEMM``: ``auto`` (default, by measurement), ``torch`` or ``onednn`` (an
error where this torch build has no oneDNN: an explicit choice never falls back).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = ["IMPLS", "MIN_SPEEDUP", "available", "choice", "linear", "linear_add", "pack", "speedup"]

IMPLS = ("auto", "torch", "onednn")
# oneDNN only where it clearly wins: the probe is one shape and a packed weight costs K·N words
MIN_SPEEDUP = 1.15


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


def choice(speedups: dict[str, float], prec: str) -> str:
    """``"onednn"`` or ``"torch"`` for GEMMs in precision ``prec`` (``"fp32"``, ``"bf16"``,
    ``"fp16"``): the environment variable, else the calibration's measured ``speedups``
    (torch's time / oneDNN's, per precision). Other precisions (float64) always use torch."""
    if prec not in ("fp32", "bf16", "fp16"):
        return "torch"
    env = requested()
    if env != "auto":
        return env
    return "onednn" if speedups.get(prec, 0.0) >= MIN_SPEEDUP else "torch"


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
