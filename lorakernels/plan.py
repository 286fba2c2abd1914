"""Per layer call and batch: merged weights or the unmerged LoRA term, per group of samples.

A *group* is the set of samples of one batch that share a mixture (the same adapters at the
same strengths). For a group of ``m`` rows whose mixture has summed rank ``R`` a layer can

* run **unmerged**: its rows share the base GEMM with every other unmerged row and add
  ``Σ w·s·(x @ A.T) @ B.T`` (``2·m·R·(K+N)`` FLOPs, plus a pass over ``x`` and ``y``), or
* run **merged**: one GEMM over its rows with ``W_g = W + Σ w·s·B @ A`` (built once for
  ``2·K·N·R`` FLOPs and ``K·N`` words, then reused from :class:`MergedCache` across denoising
  steps and requests).

Merging wins when the group's rows are many and the weight is small (SD1.5's 320/640-wide
layers at 32² and 64² latents); it loses on 77-row text layers and 1280-wide layers with few
rows. :func:`decide` compares both with a roofline cost model (FLOPs at a measured GEMM rate,
bytes at a measured bandwidth, a measured per-call overhead), calibrated on first use by a
short measurement (:func:`calibration`, < 2 s) and cached per machine in
``~/.cache/lorakernels/plan-calibration.json`` (key: CPU model, torch version, threads).

A merged weight that is not cached yet costs its build. The planner pays that only once the
unmerged path has already cost as much as the build would (ski rental: at most 2x the better
of "always merge" and "never merge", whatever the number of future steps), so a one-off batch
never merges and a 30-step request merges after a few steps.

Numerics of merged groups: ``W_g`` is computed in float32 (``W.float() + Σ (w·s·B) @ A`` with
``B``, ``A`` in float32) and stored in the dtype the merged GEMM runs in: float32 where
half-precision inputs are upcast (then nothing is rounded before the output's single
rounding), the input dtype where the calibration chose the native bf16/fp16 GEMM (rounded
once, as ``fuse_lora`` does; its error is ``|W_g|·2^-9`` per weight in bf16). Merged output
rows are ``x @ W_g.T + b`` accumulated in float32 inside the GEMM and rounded once to
``x.dtype``; the rank intermediate of unmerged rows stays float32 (see kernels/cpu.py).

Overrides (first match wins): the ``plan=`` argument of :func:`lorakernels.multi_lora_linear`,
the innermost :func:`use_plan` context, the ``LORAKERNELS_PLAN`` environment variable, then
``"auto"``. ``"merged"`` merges every group that uses an adapter (building weights as needed);
``"unmerged"`` never merges. Autograd: the cpu backend's eager forward with an input that
requires grad (grad mode on) runs unmerged, since autograd differentiates its torch ops and a
cached merged weight is not connected to ``W``, ``A`` or ``B``; no backend merges inside a
backward pass (the op's input gradient runs on a fresh ``W.T`` copy).

Who executes the plan: the cpu backend (GEMMs per run of a group's rows) and the triton
backend (one launch of the segmented kernel, merged and unmerged groups together; see
:mod:`lorakernels.kernels.triton.planned`), both through :mod:`lorakernels.kernels.hostplan`
(groups, decisions, this cache). The calibration measures a CPU: on CUDA tensors the triton
backend merges under ``"merged"`` only and runs ``"auto"`` unmerged (no GPU cost model yet);
under Triton's interpreter (CPU tensors) this calibration prices ``"auto"``. The triton
backend stores merged weights in ``x.dtype`` (rounded once, as for native half GEMMs above)
and runs unmerged inside a backward pass, while tracing and during CUDA-graph capture (a
forward that autograd records may merge: the op's gradients come from its backward formula).

Which plan ran: :func:`last_summary` (per layer type ``K x N``: calls, merged and unmerged
groups, merges built, cache hits, the base GEMM's precision); :func:`reset_summary`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import os
import platform
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

PLANS = ("auto", "merged", "unmerged")

_context_plan: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "lorakernels_plan", default=()
)
_call_plan: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lorakernels_call_plan", default=None
)


def check_plan(name: str, source: str) -> str:
    """``name`` if it is a plan (``auto``, ``merged``, ``unmerged``), else ``ValueError``."""
    if name not in PLANS:
        raise ValueError(f"{source}: unknown plan {name!r}; choose one of {', '.join(PLANS)}")
    return name


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value: object) -> Iterator[None]:
    """``var`` set to ``value`` in the enclosed block, reset on the way out (also on error):
    the scoping of :func:`use_plan`, :func:`call_plan` and ``ops.use_backend``."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


@contextlib.contextmanager
def use_plan(name: str) -> Iterator[None]:
    """Run the enclosed layer calls with plan ``name`` unless a call passes ``plan=``."""
    with scoped(_context_plan, (*_context_plan.get(), check_plan(name, "use_plan"))):
        yield


@contextlib.contextmanager
def call_plan(name: str | None) -> Iterator[None]:
    """The per-call override (``multi_lora_linear(..., plan=)``); ``None`` changes nothing."""
    if name is None:
        yield
        return
    with scoped(_call_plan, check_plan(name, "plan=")):
        yield


def resolve_plan() -> str:
    """The plan in force: per-call argument > :func:`use_plan` > ``LORAKERNELS_PLAN`` > auto."""
    name = _call_plan.get()
    if name is not None:
        return name
    stack = _context_plan.get()
    if stack:
        return stack[-1]
    env = os.environ.get("LORAKERNELS_PLAN")
    if env:
        return check_plan(env, "LORAKERNELS_PLAN")
    return "auto"


# ---------------------------------------------------------------------- ISA
@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        k, _, v = line.partition(":")
        fields.setdefault(k.strip(), v.strip())
    return f"{fields.get('model name', '?')} family {fields.get('cpu family', '?')} model " + (
        fields.get("model", "?")
    )


def native_half(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU has native GEMM instructions for ``dtype`` (else oneDNN emulates it,
    measured 3-4x slower than float32 for bf16 and ~10x for fp16 on an AVX-512 Xeon without
    them)."""
    flags = cpu_flags() if flags is None else flags
    if dtype == torch.bfloat16:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    if dtype == torch.float16:
        return bool(flags & {"avx512_fp16", "amx_fp16"})
    return False


# ---------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """Measured machine constants of the cost model (float32 unless named).

    Attributes:
        gemm_flops: FLOP/s of a mid-size ``F.linear`` per GEMM precision (``"fp32"``, and
            ``"bf16"``/``"fp16"`` where the CPU has native instructions for them).
        thin_flops: FLOP/s of the rank-``r`` shrink/expand GEMMs (float32, r = 16).
        bandwidth: bytes/s of a streaming copy (read + write counted).
        call_s: seconds of fixed cost per GEMM call (dispatch, threading).
        row_block: rows per block of the unmerged cpu path (0: one pass, no blocking).
        pack_s: seconds per weight element every GEMM call pays, per precision (packing or
            reordering the weight, reading it from memory).
        onednn_speedup: per precision, torch's GEMM time over oneDNN's with a prepacked
            weight (:func:`lorakernels.kernels.cpu_gemm.speedup`; empty: not measured, 0:
            unavailable). ``gemm_flops``, ``pack_s`` and the run overheads are measured with
            the GEMM this selects (:func:`gemm_impl`).
    """

    key: str
    gemm_flops: dict[str, float]
    thin_flops: float
    bandwidth: float
    call_s: float
    row_block: int = 0
    measured_s: float = 0.0
    pack_s: dict[str, float] = field(default_factory=dict)
    onednn_speedup: dict[str, float] = field(default_factory=dict)


def gemm_impl(cal: Calibration, prec: str, merged: bool = False) -> str:
    """The cpu backend's GEMM in precision ``prec``: ``"onednn"`` (prepacked weight) or
    ``"torch"``, by ``LORAKERNELS_CPU_GEMM`` or the measured speed-up (kernels/cpu_gemm.py);
    ``merged``: for merged weights (a lower bar: packing them costs no memory)."""
    from .kernels import cpu_gemm

    return cpu_gemm.choice(cal.onednn_speedup, prec, merged)


def merged_flops(cal: Calibration, prec: str) -> float:
    """FLOP/s of the merged groups' GEMMs: ``gemm_flops`` was fitted with the layer GEMM
    (:func:`gemm_impl`); where merged weights run oneDNN and ``W`` runs torch's, scaled by
    the measured speed-up (they differ only that way round: the merged bar is the lower)."""
    rate = cal.gemm_flops[prec]
    if gemm_impl(cal, prec, merged=True) != gemm_impl(cal, prec):
        rate *= cal.onednn_speedup[prec]
    return rate


def calibration_key() -> str:
    from .kernels import cpu_gemm

    # v2: the GEMM implementation became part of what is measured (older entries lack it)
    key = f"{cpu_model()}|torch {torch.__version__}|threads {torch.get_num_threads()}|v2"
    impl = cpu_gemm.requested()
    return key if impl == "auto" else f"{key}|gemm {impl}"


def _best_time(fn, reps: int = 5) -> float:
    """Fastest of ``reps`` calls after one warm-up: on a shared machine the minimum is the
    least disturbed sample (the cost model wants the machine's rates, not the load's)."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def measure(row_block_probe=None) -> Calibration:
    """Measure the cost model's constants now (~1 s on 2 cores).

    ``row_block_probe(block) -> seconds`` (supplied by the cpu backend) times the unmerged
    path at a reference shape with that row block (0 = unblocked); the fastest is kept.
    """
    from .kernels import cpu_gemm

    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    # GEMM time = call + pack * K * N + 2 m K N / rate, fitted from two row counts: the
    # intercept is what every call pays for its weight (packing/reordering it, reading it from
    # memory), the slope the rate at SD-sized row counts. Measured on a 2-core Xeon (1 thread):
    # sixteen 77-row GEMMs with one 768x320 weight take 1.45x one 1232-row GEMM, and oneDNN's
    # native bf16 GEMM pays ~4x fp32's intercept (its weight reorder) for a similar slope.
    k = n = 640
    m1, m2 = 128, 1024
    x = torch.randn(m2, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    xs0, ws0 = torch.randn(4, 16, generator=gen), torch.randn(16, 16, generator=gen)
    call0 = _best_time(lambda: F.linear(xs0, ws0), reps=11)
    gemm, pack, speedups = {}, {}, {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        if dt != torch.float32 and not native_half(dt):
            continue
        name = _DTYPE_NAMES[dt]
        speedups[name] = cpu_gemm.speedup(dt, lambda fn, reps: _best_time(fn, reps=reps))
        xh, wh = x.to(dt), w.to(dt)
        if cpu_gemm.choice(speedups, name) == "onednn":
            pw = cpu_gemm.pack(wh)

            def fit(m: int, xh=xh, pw=pw) -> None:
                cpu_gemm.linear(xh[:m], pw, None)
        else:

            def fit(m: int, xh=xh, wh=wh) -> None:
                F.linear(xh[:m], wh)

        t1 = _best_time(lambda fit=fit: fit(m1), reps=5)
        t2 = _best_time(lambda fit=fit: fit(m2), reps=3)
        if t2 > t1 * 1.05:
            gemm[name] = 2.0 * (m2 - m1) * k * n / (t2 - t1)
            pack[name] = max(0.0, t1 - call0 - 2.0 * m1 * k * n / gemm[name]) / (k * n)
        else:  # noise swamped the slope: no intercept
            gemm[name], pack[name] = 2.0 * m2 * k * n / t2, 0.0
    r, mt = 16, 2048
    xt = torch.randn(mt, k, generator=gen)
    a = torch.randn(r, k, generator=gen)
    thin = 2 * mt * r * k / _best_time(lambda: xt @ a.T)
    big = torch.ones(32 * 2**20 // 4)  # 32 MB: beyond the caches; smaller copies measure the
    # threads' wake-up more than memory (1 MB: 0.2 GB/s, 64 MB: 6.5 GB/s on a loaded 2-core Xeon)
    dst = torch.empty_like(big)
    bw = 2 * big.numel() * 4 / _best_time(lambda: dst.copy_(big))
    # per-call cost: what splitting one GEMM into 8 costs beyond the one GEMM (thread wake-up
    # and barriers included: with 2 threads on a loaded 2-core machine it is ~1 ms, idle ~5 us)
    xs, ws = torch.randn(2048, 320, generator=gen), torch.randn(320, 320, generator=gen)
    ys = torch.empty(2048, 320)
    one = _best_time(lambda: torch.mm(xs, ws.T, out=ys))

    def split() -> None:
        for i in range(0, 2048, 256):
            torch.mm(xs[i : i + 256], ws.T, out=ys[i : i + 256])

    call = max((_best_time(split) - one) / 7, 1e-6)
    block = 0
    if row_block_probe is not None:
        times = {b: row_block_probe(b) for b in (0, 256, 1024)}
        block = min(times, key=times.get)
        if block and times[block] > 0.95 * times[0]:
            block = 0  # blocking must win clearly: the probe is one shape
    return Calibration(
        calibration_key(),
        gemm,
        thin,
        bw,
        call,
        block,
        time.perf_counter() - t_start,
        pack,
        speedups,
    )


_calibration: Calibration | None = None
_row_block_probe = None


def set_row_block_probe(fn) -> None:
    """Registered by the cpu backend: times its unmerged path with a given row block."""
    global _row_block_probe
    _row_block_probe = fn


def cache_dir() -> Path:
    root = os.environ.get("LORAKERNELS_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorakernels"


def calibration() -> Calibration:
    """The calibration in force, measured on first use and cached per machine.

    ``LORAKERNELS_CALIBRATION``: a path to a JSON file with :class:`Calibration`'s fields
    (used as is), or ``"measure"`` to measure again and overwrite the cached entry.
    :func:`set_calibration` replaces it in this process.
    """
    global _calibration
    key = calibration_key()
    if _calibration is not None and _calibration.key == key:
        return _calibration
    env = os.environ.get("LORAKERNELS_CALIBRATION", "")
    if env and env != "measure":
        try:
            fields = json.loads(Path(env).read_text())
            _calibration = Calibration(**{**fields, "key": key})
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(
                f"LORAKERNELS_CALIBRATION={env!r}: cannot read a calibration: {exc}"
            ) from exc
        return _calibration
    path = cache_dir() / "plan-calibration.json"
    stored: dict = {}
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if env != "measure" and isinstance(stored.get(key), dict):
        try:
            _calibration = Calibration(**stored[key])
            return _calibration
        except TypeError:
            pass  # written by another version: measure again
    _calibration = measure(_row_block_probe)
    stored[key] = asdict(_calibration)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: keep the measurement for this process only
    return _calibration


def set_calibration(cal: Calibration | None) -> None:
    """Use ``cal`` in this process (``None``: measure or load again on next use)."""
    global _calibration
    _calibration = cal


# ---------------------------------------------------------------------- cost model
def gemm_time(cal: Calibration, m: int, k: int, n: int, prec: str = "fp32") -> float:
    """Seconds of one ``[m, k] x [k, n]`` GEMM: a call, the weight's per-call cost, the FLOPs."""
    if m <= 0:
        return 0.0
    return cal.call_s + cal.pack_s.get(prec, 0.0) * k * n + 2.0 * m * k * n / cal.gemm_flops[prec]


def lora_time(cal: Calibration, m: int, k: int, n: int, rank: int) -> float:
    """Seconds the unmerged LoRA term adds for ``m`` rows of summed rank ``rank``: the thin
    shrink/expand GEMMs, re-reading ``x`` (float32) and one more pass over ``y``."""
    if m <= 0 or rank <= 0:
        return 0.0
    flops = 2.0 * m * rank * (k + n) / cal.thin_flops
    mem = (m * k + 2 * m * n) * 4 / cal.bandwidth
    return 2 * cal.call_s + flops + mem


def run_overhead(cal: Calibration, m: int, k: int, n: int, prec: str = "fp32") -> float:
    """Seconds one GEMM call over ``m`` rows of a ``[K, N]`` weight costs beyond its FLOPs at
    the big-GEMM rate: what running a merged group as its own GEMMs pays per run (with the
    merged weights' GEMM, ``gemm_impl(cal, prec, merged=True)``).

    The model's ``call_s + pack_s·K·N`` is fitted at 640x640; with a measured calibration the
    real figure is measured once per (precision, rows rounded up to a power of two, K, N,
    threads) in this process and never taken below the model. Why: on a 2-core EPYC, sixteen
    256-row GEMMs at (640, 5120) took 1.26x one 4096-row GEMM (2.4 ms a call, 9x the model),
    so the planner merged a layer where the unmerged path ran 1.05x base and merging 1.19x.
    """
    model = cal.call_s + cal.pack_s.get(prec, 0.0) * k * n
    if cal.measured_s <= 0 or m <= 0:
        return model
    rows = 1 << max(0, m - 1).bit_length()
    key = (prec, rows, k, n, torch.get_num_threads())
    impl = gemm_impl(cal, prec, merged=True)
    hit = _RUN_OVERHEAD.get(key + (impl,))
    if hit is None:
        hit = _RUN_OVERHEAD[key + (impl,)] = _measure_run_overhead(prec, rows, k, n, impl)
    return max(model, hit)


_RUN_OVERHEAD: dict[tuple, float] = {}
_NAME_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _measure_run_overhead(prec: str, m: int, k: int, n: int, impl: str = "torch") -> float:
    """``(time of R GEMMs of m rows - time of one GEMM of R·m rows) / R`` at this shape, the
    rows written into slices of one output as the cpu backend does (R <= 8, R·m <= 8192 so
    the largest SD layer costs ~0.5 s once), with the cpu backend's GEMM ``impl``."""
    from .kernels import cpu_gemm

    reps_r = max(2, min(8, 8192 // m))
    gen = torch.Generator().manual_seed(0)
    dt = _NAME_DTYPES.get(prec, torch.float32)
    x = torch.randn(reps_r * m, k, generator=gen).to(dt)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dt)
    y = torch.empty(reps_r * m, n, dtype=dt)
    reps = 3 if reps_r * m * k * n < 2**32 else 2

    if impl == "onednn":
        pw = cpu_gemm.pack(w)

        def runs() -> None:
            for i in range(0, reps_r * m, m):
                y[i : i + m].copy_(cpu_gemm.linear(x[i : i + m], pw, None))

        def whole() -> None:
            cpu_gemm.linear(x, pw, None)
    else:

        def runs() -> None:
            for i in range(0, reps_r * m, m):
                torch.mm(x[i : i + m], w.T, out=y[i : i + m])

        def whole() -> None:
            torch.mm(x, w.T, out=y)

    one = _best_time(whole, reps=reps)
    return max(0.0, (_best_time(runs, reps=reps) - one) / reps_r)


def merge_time(cal: Calibration, k: int, n: int, rank: int) -> float:
    """Seconds to build one merged weight: ``B @ A`` (a GEMM of inner size ``rank``) added to a
    float32 copy of ``W`` (read ``W``, write the result)."""
    return gemm_time(cal, n, rank, k) + 3 * k * n * 4 / cal.bandwidth


@dataclass
class Group:
    """Samples of one call sharing a mixture: host facts the planner needs."""

    key: tuple  # mixture content: ((slot, strength), ...) sorted; () = no adapter here
    rows: int  # M of the group
    runs: int  # contiguous row runs (one GEMM each when merged)
    rank: int  # summed rank in this layer


def decide(
    cal: Calibration,
    groups: list[Group],
    k: int,
    n: int,
    prec: str,
    half: bool,
    cached: list[bool],
    credit: list[float],
    plan: str,
    unmerged_prec: str = "fp32",
) -> tuple[list[bool], list[float]]:
    """Which groups run merged. Returns ``(merged flags, gains)``: per group, the modelled
    seconds a cached merged weight saves per call (0 where merging does not pay); the caller
    adds the gains of groups that ran unmerged to their credit.

    ``prec``: the merged GEMMs' precision; ``unmerged_prec`` the unmerged rows' base GEMM's
    (their LoRA term is float32; ``half``: the input is bf16/fp16, so they pay the upcast of
    ``x`` and the rounding of ``y``).
    ``cached[g]``: the merged weight is in the cache. ``credit[g]``: what running unmerged has
    already cost beyond a cached merge over earlier calls (the ski-rental account): an uncached
    weight is built once ``credit + this call's gain >= its build cost`` and only for a
    mixture seen before (``credit > 0``), so a one-off call never merges. Groups without
    adapters (``rank == 0``) ride with the merged GEMMs (their weight is ``W``) when any group
    merges. The plan is kept only if its modelled time beats running everything unmerged.
    """
    active = [g.rank > 0 for g in groups]
    none = [False] * len(groups)
    zero = [0.0] * len(groups)
    if plan == "unmerged" or not any(active):
        return none, zero
    if plan == "merged":
        return active, zero
    total = sum(g.rows for g in groups)
    conv = (k + n) * 6 / cal.bandwidth if half else 0.0  # per row: x to fp32, y back
    base_all = gemm_time(cal, total, k, n, unmerged_prec)

    def lora(g: Group) -> float:
        return lora_time(cal, g.rows, k, n, g.rank) - 2 * cal.call_s

    rate = merged_flops(cal, prec)

    def run_cost(g: Group) -> float:
        m_run = math.ceil(g.rows / g.runs)
        return 2.0 * g.rows * k * n / rate + g.runs * run_overhead(cal, m_run, k, n, prec)

    merged, gains = [], []
    for g, c, acc in zip(groups, cached, credit, strict=True):
        if g.rank == 0:
            merged.append(False)
            gains.append(0.0)
            continue
        gain = base_all * g.rows / total + g.rows * conv + lora(g) - run_cost(g)
        if gain > 0 and (c or (acc > 0 and acc + gain >= merge_time(cal, k, n, g.rank))):
            merged.append(True)
            gains.append(gain)
        else:
            merged.append(False)
            gains.append(max(gain, 0.0))
    if not any(merged):
        return merged, gains
    all_unmerged = (
        base_all + total * conv + sum(lora(g) for g in groups if g.rank) + 3 * (cal.call_s)
    )
    rest = [g for g, mg in zip(groups, merged, strict=True) if not mg and g.rank]
    chosen = sum(run_cost(g) for g, mg in zip(groups, merged, strict=True) if mg or not g.rank)
    if rest:
        m_rest = sum(g.rows for g in rest)
        chosen += gemm_time(cal, m_rest, k, n, unmerged_prec) + m_rest * conv + 3 * cal.call_s
        chosen += sum(lora(g) for g in rest) + 2 * m_rest * (k + n) * 4 / cal.bandwidth
    if chosen >= all_unmerged:
        return none, gains
    return merged, gains


def choose_precision(cal: Calibration, dtype: torch.dtype, m: int, k: int, n: int) -> str:
    """``"fp32"`` (upcast, one rounding) or the half dtype's name (native GEMM) for a layer.

    Native only where the CPU has the instructions (:func:`native_half`) and it is faster.
    With a measured calibration, "faster" is measured once per (dtype, rows rounded up to a
    power of two, K, N, threads) at that shape: the model's rates come from one mid-size
    GEMM and miss what decides here (on a 2-core avx512_bf16 Xeon at (65536, 320, 320), 2
    threads: bf16 ``F.linear`` 85 ms, the upcast path 106 ms of which 38 ms are the two dtype
    conversions — 8x slower than a same-dtype copy, so the copy bandwidth underprices them).
    A calibration set by hand (``measured_s == 0``, tests) is used as given, through the model.
    """
    name = _DTYPE_NAMES.get(dtype)
    if name is None or name == "fp32" or name not in cal.gemm_flops:
        return "fp32"
    if cal.measured_s > 0:
        # rows matter: at (8192, 320, 320) the upcast path wins (7.4 vs 10.2 ms), at 65536 rows
        # native bf16 does (89 vs 113 ms: float32 rows no longer fit the caches), so measure at
        # the bucket's size (one-time cost: about 2 s for the largest SD layer on 2 cores)
        rows = 1 << max(0, m - 1).bit_length()
        key = (name, rows, k, n, torch.get_num_threads())
        hit = _PRECISION.get(key)
        if hit is None:
            hit = _PRECISION[key] = _measure_precision(dtype, name, rows, k, n)
        return hit
    up = gemm_time(cal, m, k, n, "fp32") + (m * k * 6 + m * n * 6) / cal.bandwidth
    native = gemm_time(cal, m, k, n, name)
    return name if native < up else "fp32"


_PRECISION: dict[tuple, str] = {}


def _measure_precision(dtype: torch.dtype, name: str, m: int, k: int, n: int) -> str:
    """Time native ``F.linear`` in ``dtype`` against the upcast path (``x`` to float32, the
    float32 GEMM with a cached float32 weight, the result back to ``dtype``) at this shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w32 = torch.randn(n, k, generator=gen) / math.sqrt(k)
    w = w32.to(dtype)
    reps = 2 if m * k * n < 2**32 else 1  # one timed call each for the largest layers
    native = _best_time(lambda: F.linear(x, w), reps=reps)
    up = _best_time(lambda: F.linear(x.float(), w32).to(dtype), reps=reps)
    return name if native < up else "fp32"


# ---------------------------------------------------------------------- merged-weight cache
def _int_view(t: Tensor) -> Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


_HASH_W = torch.empty(0, dtype=torch.int64)


def content_hash(t: Tensor) -> int:
    """An exact hash of ``t``'s bits (any change of any element changes it, up to 2^-64).

    Computed on the host: a device tensor is copied there first (it is read once per merged
    weight built and per bank change, never per call)."""
    global _HASH_W
    bits = _int_view(t.detach().cpu()).reshape(-1).to(torch.int64)
    if _HASH_W.numel() < bits.numel():
        g = torch.Generator().manual_seed(12345)
        size = max(bits.numel(), 2 * _HASH_W.numel())
        _HASH_W = torch.randint(-(2**62), 2**62, (size,), generator=g) * 2 + 1  # odd
    return int((bits * _HASH_W[: bits.numel()]).sum()) ^ bits.numel()


class _Layer:
    """Per-layer state: what the cached entries of one layer were built from.

    ``derived``: values a backend builds from this layer's cached entries (the triton
    backend's stacked merged weights); emptied whenever one of the layer's entries is removed,
    ``W`` changes, or the cache is cleared, so it never outlives what it was built from.
    """

    __slots__ = (
        "__weakref__",
        "bank_stamp",
        "derived",
        "entries",
        "ref",
        "slot_fp",
        "weight_stamp",
    )

    def __init__(self, ref) -> None:
        self.ref = ref
        self.bank_stamp: tuple | None = None
        self.weight_stamp: tuple | None = None
        self.slot_fp: dict[int, tuple] = {}
        self.entries: set[tuple] = set()
        self.derived: dict = {}


def weight_stamp(w: Tensor) -> tuple:
    """Identity and version of a weight (views of one parameter share the version counter)."""
    return (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w._version)


def bank_stamp(*tensors: Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


class MergedCache:
    """Merged weights keyed by (layer, mixture content, precision), bounded in bytes (LRU).

    Never stale: :meth:`validate` runs before every lookup of a layer and drops exactly the
    entries whose inputs changed: all of the layer's entries when ``W`` changed in place or
    was replaced (its data pointer, shape or version counter moved), and, when the bank's
    tensors changed (a load, unload, reload or replacement), the entries that use a slot whose
    rank, scale or rows' contents changed. Rows that merely moved (an unrelated adapter was
    unloaded and the bank compacted) keep their entries: slots are fingerprinted by content.
    A strength is part of the key, so a new strength is a new entry.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.bytes = 0
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()
        self._density: dict[tuple, float] = {}
        self._used: dict[tuple, float] = {}
        self.stale_s = 60.0  # an entry unused this long belongs to a finished request
        # layers run concurrently when several threads serve one model (issue 10, A4)
        self.lock = threading.RLock()
        self.evicted = 0
        self._layers: dict[int, _Layer] = {}
        self.credit: OrderedDict[tuple, float] = OrderedDict()
        self.hits = 0
        self.builds = 0
        self.invalidated = 0

    def _layer_unlocked(self, anchor: Tensor) -> _Layer:
        """The state of the layer whose bank owns ``anchor`` (its ``lora_a``)."""
        lid = id(anchor)
        st = self._layers.get(lid)
        if st is None or st.ref() is not anchor:
            if st is not None:
                self._drop_layer(lid, st)

            def gone(_ref, lid=lid) -> None:
                with self.lock:
                    old = self._layers.get(lid)
                    if old is not None and old.ref is _ref:
                        self._drop_layer(lid, old)

            st = _Layer(weakref.ref(anchor, gone))
            self._layers[lid] = st
        return st

    def _drop_layer(self, lid: int, st: _Layer) -> None:
        for key in list(st.entries):
            self._remove(key)
        self._layers.pop(lid, None)

    def _remove(self, key: tuple) -> None:
        self._density.pop(key, None)
        self._used.pop(key, None)
        t = self._entries.pop(key, None)
        if t is not None:
            self.bytes -= t.numel() * t.element_size()
            self.invalidated += 1
        st = self._layers.get(key[0])
        if st is not None:
            st.entries.discard(key)
            st.derived.clear()

    def _validate_unlocked(self, st: _Layer, w_stamp: tuple, b_stamp: tuple, slot_fp) -> None:
        """Drop the entries of layer ``st`` that ``W`` or the bank no longer match.

        ``slot_fp(slot) -> fingerprint`` is called only when the bank's tensors changed, for the
        slots that cached entries use.
        """
        if st.weight_stamp != w_stamp:
            for key in list(st.entries):
                self._remove(key)
            st.slot_fp.clear()
            st.derived.clear()
            st.weight_stamp = w_stamp
        if st.bank_stamp != b_stamp:
            stale = {s for s, fp in st.slot_fp.items() if slot_fp(s) != fp}
            for key in list(st.entries):
                if any(s in stale for s, _ in key[1]):
                    self._remove(key)
            for s in stale:
                st.slot_fp.pop(s, None)
            st.bank_stamp = b_stamp

    def has(self, key: tuple) -> bool:
        return key in self._entries

    def peek(self, key: tuple) -> Tensor | None:
        """The entry of ``key`` without counting a hit or refreshing its LRU position."""
        return self._entries.get(key)

    def _get_unlocked(self, key: tuple) -> Tensor | None:
        t = self._entries.get(key)
        if t is not None:
            self._entries.move_to_end(key)
            self._used[key] = time.monotonic()
            self.hits += 1
        return t

    def _put_unlocked(
        self, st: _Layer, key: tuple, t: Tensor, fps: dict[int, tuple], density: float = 0.0
    ) -> bool:
        """Insert ``t``; False (nothing changes) when it does not fit.

        ``density``: seconds saved per call per byte. Room is made from entries unused for
        :attr:`stale_s` seconds (least recently used first), then from entries of lower
        density (lowest first); an entry that would have to evict denser, recently used ones
        is refused. So a working set larger than the budget keeps its most valuable weights
        (SD1.5's narrow image layers) instead of cycling through all of them (LRU alone
        evicts every weight before its reuse under a cyclic access pattern).
        """
        size = t.numel() * t.element_size()
        if size > self.budget:
            return False
        if self.bytes + size > self.budget:
            now = time.monotonic()
            order = list(self._entries)  # least recently used first
            stale = [k for k in order if now - self._used.get(k, 0.0) > self.stale_s]
            cheaper = sorted(
                (k for k in order if k not in set(stale) and self._density.get(k, 0.0) < density),
                key=lambda k: self._density.get(k, 0.0),
            )
            need = self.bytes + size - self.budget
            victims = []
            for k in stale + cheaper:
                if need <= 0:
                    break
                victims.append(k)
                e = self._entries[k]
                need -= e.numel() * e.element_size()
            if need > 0:
                return False
            for k in victims:
                self._remove(k)
                self.invalidated -= 1  # an eviction, not an invalidation
                self.evicted += 1
        self._entries[key] = t
        self._density[key] = density
        self._used[key] = time.monotonic()
        self.bytes += size
        st.entries.add(key)
        st.slot_fp.update(fps)
        self.builds += 1
        return True

    def _clear_unlocked(self) -> None:
        self._entries.clear()
        self._density.clear()
        self._used.clear()
        for st in self._layers.values():
            st.entries.clear()
            st.slot_fp.clear()
            st.derived.clear()
        self.bytes = 0
        self.credit.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def layer(self, anchor: Tensor) -> _Layer:
        """The state of the layer whose bank owns ``anchor`` (its ``lora_a``)."""
        with self.lock:
            return self._layer_unlocked(anchor)

    def validate(self, st: _Layer, w_stamp: tuple, b_stamp: tuple, slot_fp) -> None:
        """See :meth:`_validate_unlocked`."""
        with self.lock:
            self._validate_unlocked(st, w_stamp, b_stamp, slot_fp)

    def get(self, key: tuple) -> Tensor | None:
        with self.lock:
            return self._get_unlocked(key)

    def put(self, st, key, t, fps, density: float = 0.0) -> bool:
        """See :meth:`_put_unlocked`."""
        with self.lock:
            return self._put_unlocked(st, key, t, fps, density)

    def clear(self) -> None:
        with self.lock:
            self._clear_unlocked()


def _default_budget() -> int:
    mb = os.environ.get("LORAKERNELS_MERGE_CACHE_MB")
    if mb:
        try:
            return int(float(mb) * 2**20)
        except ValueError:
            raise ValueError(f"LORAKERNELS_MERGE_CACHE_MB must be a number, got {mb!r}") from None
    return 2 * 2**30


CACHE = MergedCache(_default_budget())


# ---------------------------------------------------------------------- summary
_summary: dict[str, dict] = {}


def record(
    k: int,
    n: int,
    prec: str,
    merged: int,
    unmerged: int,
    built: int,
    hits: int,
    gemm: str = "torch",
) -> None:
    s = _summary.setdefault(
        f"{k}x{n}",
        {"calls": 0, "merged_groups": 0, "unmerged_groups": 0, "built": 0, "hits": 0},
    )
    s["calls"] += 1
    s["merged_groups"] += merged
    s["unmerged_groups"] += unmerged
    s["built"] += built
    s["hits"] += hits
    s["precision"] = prec
    s["gemm"] = gemm
    s["last"] = f"{merged} merged / {unmerged} unmerged"


def last_summary() -> dict[str, dict]:
    """Per layer type ``"KxN"``: calls, merged/unmerged groups run, merged weights built,
    cache hits, the base GEMM precision, the CPU GEMM (``"torch"`` or ``"onednn"``, see
    kernels/cpu_gemm.py) and the last call's split, since :func:`reset_summary`.
    """
    return {k: dict(v) for k, v in _summary.items()}


def reset_summary() -> None:
    _summary.clear()
