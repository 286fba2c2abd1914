"""CPU backend: per group of samples, a merged GEMM or the unmerged LoRA term (planned).

Semantics: the loop in :mod:`lorakernels.kernels`. Samples sharing a mixture form a group;
:mod:`lorakernels.plan` decides per call which groups run *merged* and which *unmerged*:

    # merged group g (weight cached across calls, see lorakernels.plan for its numerics)
    y[rows_g] = x[rows_g] @ (W + Σ w·s·B @ A).T + b          # one GEMM per run of rows
    # unmerged rows (all of them when nothing merges), batched over samples:
    A_s = rows of every entry of sample s, concatenated   # [S, R_max, K], R_max = max summed rank
    t = bmm(x.view(S, T, K), A_s.transpose(1, 2))          # fp32 [S, T, R_max], never rounded
    t *= strength * scale per column (0 on padding columns)
    y = baddbmm(bias, t, B_s)                              # B_s = rows of B.T, [S, R_max, N]
    y += x @ W.T                                           # ONE GEMM over the rows (beta=1)
    # packed rows or very uneven ranks: one (shrink, expand) pair per run of consecutive
    # samples that share a mixture; row-blocked when the calibration measured it faster

Why this shape (measured on our 2-core AVX-512 CPUs, 16 samples, 8 rank-16 adapters):

* one big GEMM keeps the base at full BLAS efficiency; the LoRA term's cost is memory traffic
  (re-reading ``x``, a pass over ``y``), not FLOPs. Writing the LoRA term first and letting the
  base GEMM accumulate onto it (``beta=1``) hides the pass over ``y`` inside the compute-bound
  GEMM: 1.13x vs 1.21x base at (4096, 320, 320);
* where a group's rows are many and ``W`` is small, a merged weight removes the LoRA passes
  entirely (best-case merging measured 0.9-1.0x base at SD1.5's 320/640-wide image layers
  against 1.1-1.25x for the unmerged term): the planner picks it there;
* row blocks (rows in blocks whose ``x`` and ``y`` stay in cache between the shrink, expand and
  base GEMM) measured 1.07-1.4x slower on one Xeon and faster on an EPYC: the calibration
  times both once per machine (``plan.Calibration.row_block``);
* the host plan (groups, gathered ``A``/``B`` rows) is cached per batch and bank *version*: the
  key is the tensors' identities and ``_version`` counters (no ``.tolist()`` on a hit).

Numerics: float32 compute for float32/float16/bfloat16 inputs, float64 for float64; the rank
intermediate ``t`` is float32 (or float64); one rounding to ``x.dtype`` at the end.

Half precision by ISA (issue 10 B): rows that run *unmerged* always compute in float32 (``x``
upcast, ``W`` upcast once and cached per layer): torch's CPU GEMM has no float32 output for
half inputs, so a native half base GEMM would round the base before the float32 LoRA term is
added (two roundings). *Merged* groups, and layers where no sample uses an adapter, run the
native half GEMM (``F.linear`` in the dtype, one rounding; merged weights rounded once, see
:mod:`lorakernels.plan`) when the CPU has the instructions (avx512_bf16/amx_bf16,
avx512_fp16/amx_fp16) AND the calibration measured it faster at this shape than the float32
GEMM plus the conversions (``plan.choose_precision``). Measured on an avx512_bf16 Xeon without
AMX (oneDNN's avx512_core_bf16 brgemm, 1 thread): bf16 ran 1.6-2.6x slower than float32 at SD
shapes, so bf16 stays upcast there; where bf16 is emulated it is 3-4x slower and never chosen.

Autograd: when ``x`` or ``weight`` requires grad, everything runs unmerged (a cached merged
weight is not connected to ``W``). float64 always runs unmerged (it is the oracle's dtype).

Padding: the batched form pads every sample to the largest summed rank in the batch; it is
used only while the padded work stays under 1.5x the real work, else the per-run form runs.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from .. import plan as _planner
from . import LoRAArgs, compute_dtype
from .cpu_conv import multi_lora_conv2d

__all__ = ["multi_lora_conv2d", "multi_lora_linear", "unavailable_reason"]

_MAX_PAD_WASTE = 1.5
_DTYPE_NAME = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}
_DTYPE_NAME[torch.float16] = "fp16"


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only (got {device.type})"
    return None


# ---------------------------------------------------------------------- unmerged core
class _Plan:
    """What the unmerged LoRA term needs from the host (one per sample subset).

    ``kind`` is ``"none"`` (no sample uses an adapter in this layer), ``"batched"`` (equal-length
    samples ``s0 .. s1-1``, gather ``index`` rows, padded to ``rmax``) or ``"runs"`` (a list of
    ``(row0, row1, index, coef)`` per run of consecutive samples sharing a mixture).
    ``gathered`` caches the gathered ``A``/``B`` rows in the compute dtype (the plan's key pins
    the bank's version, so they stay valid while the plan is cached).
    """

    __slots__ = ("coef", "gathered", "index", "kind", "rmax", "rows", "runs", "s0", "s1")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.gathered = None


def _build_plan(rows, per_sample, ct, device) -> _Plan:
    """``per_sample[s]``: ``((start, rank, coef), ...)``; ``rows``: row pointer (host ints)."""
    real = [sum(r for _, r, _ in items) for items in per_sample]
    if not any(real):
        return _Plan("none")
    lengths = {rows[s + 1] - rows[s] for s in range(len(per_sample))}
    active = [s for s, rs in enumerate(real) if rs]
    s0, s1 = active[0], active[-1] + 1
    rmax = max(real)
    if len(lengths) == 1 and (s1 - s0) * rmax <= _MAX_PAD_WASTE * sum(real):
        idx, coef = [], []
        for s in range(s0, s1):
            n = 0
            for start, r, c in per_sample[s]:
                idx.extend(range(start, start + r))
                coef.extend([c] * r)
                n += r
            # padding columns read bank row 0 (finite) and are zeroed by a 0 coefficient
            idx.extend([0] * (rmax - n))
            coef.extend([0.0] * (rmax - n))
        plan = _Plan("batched")
        plan.s0, plan.s1, plan.rmax, plan.rows = s0, s1, rmax, rows
        plan.index = torch.tensor(idx, dtype=torch.long, device=device)
        plan.coef = torch.tensor(coef, dtype=ct, device=device).view(s1 - s0, 1, rmax)
        return plan
    runs, s, n = [], 0, len(per_sample)
    while s < n:
        e = s + 1
        while e < n and per_sample[e] == per_sample[s]:
            e += 1
        items = per_sample[s]
        if items and rows[e] > rows[s]:
            idx = [i for st, r, _ in items for i in range(st, st + r)]
            coef = [c for _, r, c in items for _ in range(r)]
            runs.append(
                (
                    rows[s],
                    rows[e],
                    torch.tensor(idx, dtype=torch.long, device=device),
                    torch.tensor(coef, dtype=ct, device=device),
                )
            )
        s = e
    plan = _Plan("runs")
    plan.runs = runs
    return plan


def _gathered(plan: _Plan, lora_a: Tensor, lora_bt: Tensor, ct) -> list:
    if plan.gathered is None:
        if plan.kind == "batched":
            n_s = plan.s1 - plan.s0
            a_s = lora_a.index_select(0, plan.index).to(ct).view(n_s, plan.rmax, -1)
            b_s = lora_bt.index_select(0, plan.index).to(ct).view(n_s, plan.rmax, -1)
            plan.gathered = [(a_s.transpose(1, 2), b_s)]
        else:
            plan.gathered = [
                (lora_a.index_select(0, i).to(ct).T, lora_bt.index_select(0, i).to(ct))
                for _, _, i, _ in plan.runs
            ]
    return plan.gathered


def _lora_term(plan: _Plan, xc: Tensor, lora_a: Tensor, lora_bt: Tensor, ct, bias) -> Tensor:
    """``bias + Σ coef * (x @ A.T) @ B.T`` as a fresh ``[M, N]`` tensor in ``ct`` (fp32)."""
    m, n = xc.shape[0], lora_bt.shape[1]
    if plan.kind == "batched":
        rows, s0, s1 = plan.rows, plan.s0, plan.s1
        n_s = s1 - s0
        t_rows = rows[1] - rows[0]
        ((a_t, b_s),) = _gathered(plan, lora_a, lora_bt, ct)
        t = torch.bmm(xc[rows[s0] : rows[s1]].view(n_s, t_rows, -1), a_t)
        t.mul_(plan.coef)
        if s0 == 0 and rows[s1] == m:
            init = bias.view(1, 1, n) if bias is not None else None
            y = torch.baddbmm(init, t, b_s) if init is not None else torch.bmm(t, b_s)
            return y.view(m, n)
        y = _base_init(bias, m, n, ct, xc.device)
        y[rows[s0] : rows[s1]].view(n_s, t_rows, n).baddbmm_(t, b_s)
        return y
    y = _base_init(bias, m, n, ct, xc.device)
    for (r0, r1, _, coef), (a_t, b_r) in zip(
        plan.runs, _gathered(plan, lora_a, lora_bt, ct), strict=True
    ):
        t = xc[r0:r1] @ a_t
        t.mul_(coef)
        y[r0:r1].addmm_(t, b_r)
    return y


def _base_init(bias, m: int, n: int, ct, device) -> Tensor:
    if bias is None:
        return torch.zeros(m, n, dtype=ct, device=device)
    return bias.to(ct).expand(m, n).clone()


def _blocked(plan: _Plan, xc, w, b, lora_a, lora_bt, ct, block: int) -> Tensor:
    """The unmerged rows in row blocks: per block, shrink, expand and the base GEMM run while
    the block's ``x`` and ``y`` are in cache. Same numerics as the one-pass form."""
    m, n = xc.shape[0], w.shape[0]
    y = torch.empty(m, n, dtype=ct, device=xc.device)
    covered = []
    if plan.kind == "batched":
        ((a_t, b_s),) = _gathered(plan, lora_a, lora_bt, ct)
        segs = [
            (plan.rows[s], plan.rows[s + 1], a_t[i], b_s[i], plan.coef[i, 0])
            for i, s in enumerate(range(plan.s0, plan.s1))
        ]
    else:
        segs = [
            (r0, r1, a_t, b_r, coef)
            for (r0, r1, _, coef), (a_t, b_r) in zip(
                plan.runs, _gathered(plan, lora_a, lora_bt, ct), strict=True
            )
        ]
    wt = w.T
    for r0, r1, a_t, b_r, coef in segs:
        for q0 in range(r0, r1, block):
            q1 = min(q0 + block, r1)
            xb, yb = xc[q0:q1], y[q0:q1]
            t = xb @ a_t
            t.mul_(coef)
            if b is not None:
                torch.addmm(b, t, b_r, out=yb)
            else:
                torch.mm(t, b_r, out=yb)
            yb.addmm_(xb, wt)
        covered.append((r0, r1))
    covered.sort()
    pos = 0
    for r0, r1 in covered + [(m, m)]:
        if r0 > pos:  # rows of samples without an adapter: the base GEMM only
            if b is not None:
                torch.addmm(b, xc[pos:r0], wt, out=y[pos:r0])
            else:
                torch.mm(xc[pos:r0], wt, out=y[pos:r0])
        pos = max(pos, r1)
    return y


def _unmerged(plan: _Plan, xc, w, b, lora_a, lora_bt, ct, block: int) -> Tensor:
    """``x @ w.T + b + LoRA term`` for the plan's rows, in ``ct``."""
    if plan.kind == "none":
        return torch.addmm(b, xc, w.T) if b is not None else xc @ w.T
    if block and xc.shape[0] > 2 * block:
        return _blocked(plan, xc, w, b, lora_a, lora_bt, ct, block)
    # LoRA term first, then the base GEMM accumulates onto it (beta=1): the GEMM reads y while
    # it is compute-bound, which hides the pass over y that a separate "y += t @ B" would cost
    # (measured 1.13 vs 1.21 x base at (4096, 320, 320), 1 thread)
    y = _lora_term(plan, xc, lora_a, lora_bt, ct, b)
    y.addmm_(xc, w.T)
    return y


# ---------------------------------------------------------------------- host plan
class _Host:
    """Host facts of one (batch content, bank content, row count): groups and their plans."""

    __slots__ = (
        "groups",
        "group_items",
        "group_runs",
        "group_samples",
        "owner",
        "per_sample",
        "ranks",
        "rows",
        "scales",
        "starts",
        "subplans",
    )


_HOST: OrderedDict[tuple, _Host] = OrderedDict()  # content key -> host plan
_FAST: OrderedDict[tuple, tuple] = OrderedDict()  # (id, _version) key -> (weakrefs, content)
_HOST_LOCK = threading.Lock()  # threads serving one model share these caches
_HOST_SIZE = 1024  # a UNet has ~200 patched layers x a few row counts; plans are small


def _content_key(tensors, ct) -> tuple:
    row_ptr, entry_ptr, entry_slot, entry_weight, slot_start, slot_rank, slot_scale = tensors
    ptr = tuple(entry_ptr.tolist())
    e = ptr[-1]
    return (
        tuple(row_ptr.tolist()),
        ptr,
        tuple(entry_slot[:e].tolist()),
        tuple(entry_weight[:e].tolist()),
        tuple(slot_start.tolist()),
        tuple(slot_rank.tolist()),
        tuple(slot_scale.tolist()),
        ct,
    )


def _build_host(key: tuple, device) -> _Host:
    rows, ptr, slots, weights, starts, ranks, scales, ct = key[:8]
    h = _Host()
    h.owner = None
    h.rows, h.starts, h.ranks, h.scales = rows, starts, ranks, scales
    per_sample, mixes = [], []
    for s in range(len(rows) - 1):
        items, mix = [], []
        for j in range(ptr[s], ptr[s + 1]):
            k = slots[j]
            if ranks[k] > 0:
                items.append((starts[k], ranks[k], weights[j] * scales[k]))
                mix.append((k, weights[j]))
        per_sample.append(tuple(items))
        mixes.append(tuple(sorted(mix)))
    h.per_sample = per_sample
    order: dict[tuple, int] = {}
    h.group_samples, h.group_items, h.group_runs, h.groups = [], [], [], []
    for s, mix in enumerate(mixes):
        g = order.setdefault(mix, len(order))
        if g == len(h.group_samples):
            h.group_samples.append([])
            h.group_items.append(tuple(sorted((k, starts[k], ranks[k], w) for k, w in mix)))
        h.group_samples[g].append(s)
    for mix, g in order.items():
        runs: list[list[int]] = []
        for s in h.group_samples[g]:
            if runs and runs[-1][1] == rows[s]:
                runs[-1][1] = rows[s + 1]
            elif rows[s + 1] > rows[s]:
                runs.append([rows[s], rows[s + 1]])
        h.group_runs.append([tuple(r) for r in runs])
        m = sum(r1 - r0 for r0, r1 in runs)
        rank = sum(ranks[k] for k, _ in mix)
        h.groups.append(_planner.Group(mix, m, max(1, len(runs)), rank))
    h.subplans = {}
    return h


def _host(tensors, ct, lora_a: Tensor, lora_bt: Tensor) -> _Host:
    with _HOST_LOCK:
        return _host_unlocked(tensors, ct, lora_a, lora_bt)


def _host_unlocked(tensors, ct, lora_a: Tensor, lora_bt: Tensor) -> _Host:
    """The host plan for these tensors' contents and this layer's bank (its gathered rows are
    the layer's). Fast path: the same tensor objects at the same ``_version`` counters (every
    in-place write bumps them) map to the cached plan without reading them; otherwise read
    them (``.tolist()``) and look the content up."""
    owned = (*tensors, lora_a, lora_bt)
    fast = (ct, *((id(t), t._version) for t in owned))
    hit = _FAST.get(fast)
    if hit is not None:
        refs, ckey = hit
        if all(r() is t for r, t in zip(refs, owned, strict=True)):
            h = _HOST.get(ckey)
            if h is not None:
                return h
    layer = tuple((id(t), t.data_ptr(), t._version) for t in (lora_a, lora_bt))
    ckey = (*_content_key(tensors, ct), layer)
    h = _HOST.get(ckey)
    if h is None:
        h = _build_host(ckey, tensors[0].device)
        _HOST[ckey] = h
        if len(_HOST) > _HOST_SIZE:
            _HOST.popitem(last=False)
    else:
        _HOST.move_to_end(ckey)
    if h.owner is None or any(
        r() is not t for r, t in zip(h.owner, (lora_a, lora_bt), strict=True)
    ):
        # a new layer reusing a dead one's ids: its gathered rows are not ours
        h.owner = (weakref.ref(lora_a), weakref.ref(lora_bt))
        h.subplans = {}
    _FAST[fast] = (tuple(weakref.ref(t) for t in owned), ckey)
    if len(_FAST) > _HOST_SIZE:
        _FAST.popitem(last=False)
    return h


def _subplan(h: _Host, samples: tuple[int, ...] | None, ct, device):
    """``(plan, rows slices)`` of the unmerged core over ``samples`` (None: all samples)."""
    sp = h.subplans.get(samples)
    if sp is None:
        if samples is None:
            sp = (_build_plan(h.rows, h.per_sample, ct, device), None)
        else:
            spans, rows = [], [0]
            for s in samples:
                r0, r1 = h.rows[s], h.rows[s + 1]
                if spans and spans[-1][1] == r0:
                    spans[-1] = (spans[-1][0], r1)
                else:
                    spans.append((r0, r1))
                rows.append(rows[-1] + r1 - r0)
            per = [h.per_sample[s] for s in samples]
            sp = (_build_plan(tuple(rows), per, ct, device), spans)
        h.subplans[samples] = sp
    return sp


# ---------------------------------------------------------------------- merged weights
def _slot_fp(h: _Host, lora_a: Tensor, lora_bt: Tensor):
    def fp(slot: int) -> tuple:
        if slot >= len(h.ranks) or h.ranks[slot] == 0:
            return ("absent",)
        st, r = h.starts[slot], h.ranks[slot]
        return (
            r,
            h.scales[slot],
            _planner.content_hash(lora_a[st : st + r]),
            _planner.content_hash(lora_bt[st : st + r]),
        )

    return fp


def _merge(weight: Tensor, items, scales, lora_a, lora_bt, store) -> Tensor:
    """``W + Σ w·s·B @ A`` in float32, stored as ``store`` (see lorakernels.plan: numerics)."""
    bc = torch.cat([lora_bt[st : st + r].float().T * (w * scales[k]) for k, st, r, w in items], 1)
    ac = torch.cat([lora_a[st : st + r].float() for _, st, r, _ in items], 0)
    return torch.addmm(weight.float(), bc, ac).to(store)


def _gemm_into(y: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> None:
    if b is not None:
        torch.addmm(b, x, w.T, out=y)
    else:
        torch.mm(x, w.T, out=y)


_PROBE_ROWS = (4, 1024, 320, 320, 16)  # samples, rows each, K, N, rank


def _row_block_probe(block: int) -> float:
    """Seconds of the unmerged path at an SD1.5 image shape with row block ``block``."""
    s, t, k, n, r = _PROBE_ROWS
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s * t, k, generator=g)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    a = torch.randn(s * r, k, generator=g)
    bt = torch.randn(s * r, n, generator=g)
    rows = tuple(range(0, s * t + 1, t))
    per = [((i * r, r, 0.5),) for i in range(s)]
    plan = _build_plan(rows, per, torch.float32, x.device)
    return _planner._best_time(
        lambda: _unmerged(plan, x, w, None, a, bt, torch.float32, block), reps=3
    )


_planner.set_row_block_probe(_row_block_probe)


# ---------------------------------------------------------------------- entry
def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs) -> Tensor:
    """``[M, K] -> [M, N]``; see :mod:`lorakernels.kernels` for the argument table."""
    # the CPU plan reads exact values from the (host) tensors, not lora.meta's bounds
    tensors = (*lora.batch, *lora.bank[2:])
    return _forward(x, weight, bias, lora.bank.lora_a, lora.bank.lora_bt, tensors)


def _forward(x, weight, bias, lora_a, lora_bt, tensors) -> Tensor:
    ct = compute_dtype(x.dtype)
    h = _host(tensors, ct, lora_a, lora_bt)
    m, k = x.shape
    n = weight.shape[0]
    groups = h.groups
    active = any(g.rank for g in groups)
    grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    mode = "unmerged" if grad or ct == torch.float64 else _planner.resolve_plan()
    half = x.dtype in (torch.bfloat16, torch.float16)
    cal = None
    if not grad and ((mode == "auto" and active) or half):
        cal = _planner.calibration()
    # the half-precision GEMMs run per run of a group's rows when adapters are active (the
    # crossover depends on rows: upcast wins at 8192 x 320 x 320, native at 65536)
    m_gemm = max((r1 - r0 for runs in h.group_runs for r0, r1 in runs), default=m) if active else m
    native = (
        half and cal is not None and _planner.choose_precision(cal, x.dtype, m_gemm, k, n) != "fp32"
    )
    prec = _DTYPE_NAME.get(x.dtype if native else ct, "fp32")
    mdt = x.dtype if native else ct  # merged GEMMs (and rows without adapters) run in mdt
    cache = _planner.CACHE
    st = None
    if not grad and (half or (mode != "unmerged" and active)):
        st = cache.layer(lora_a)
        cache.validate(
            st,
            _planner.weight_stamp(weight),
            _planner.bank_stamp(lora_a, lora_bt, *tensors[4:]),
            _slot_fp(h, lora_a, lora_bt),
        )
    if not active and native:
        return torch.nn.functional.linear(x, weight, bias)  # the base layer itself
    # unmerged rows compute in ct: float32 copies of half weights are cached per layer
    if weight.dtype == ct or st is None:
        w32 = weight.to(ct)
    else:
        wkey = (id(lora_a), (), "W", ct)
        w32 = cache.get(wkey)
        if w32 is None:
            w32 = weight.to(ct)
            cache.put(st, wkey, w32, {})
    b32 = None if bias is None else bias.to(ct)
    if mode == "unmerged" or not active:
        merged = [False] * len(groups)
        gains = [0.0] * len(groups)
        built = hits = 0
    else:
        keys = [(id(lora_a), g.key, prec) for g in groups]
        cached = [g.rank > 0 and cache.has(kk) for g, kk in zip(groups, keys, strict=True)]
        credit = [cache.credit.get(kk, 0.0) for kk in keys]
        merged, gains = _planner.decide(cal, groups, k, n, prec, half, cached, credit, mode)
        with cache.lock:
            for kk, gain, mg in zip(keys, gains, merged, strict=True):
                if gain and not mg:
                    cache.credit[kk] = cache.credit.get(kk, 0.0) + gain
                    cache.credit.move_to_end(kk)
            while len(cache.credit) > 4096:
                cache.credit.popitem(last=False)
        hits = sum(1 for mg, c in zip(merged, cached, strict=True) if mg and c)
        built = sum(1 for mg, c in zip(merged, cached, strict=True) if mg and not c)
    block = cal.row_block if cal is not None else 0
    n_unmerged = sum(1 for g, mg in zip(groups, merged, strict=True) if not mg and g.rank)
    if not any(merged):
        sp, _ = _subplan(h, None, ct, x.device)
        y = _unmerged(sp, x.to(ct), w32, b32, lora_a, lora_bt, ct, block)
        _planner.record(k, n, prec, 0, n_unmerged, 0, 0)
        return y.to(x.dtype)
    y = torch.empty(m, n, dtype=mdt, device=x.device)
    xg = x.to(mdt)
    wbase = weight if weight.dtype == mdt else w32
    bg = None if bias is None else bias.to(mdt)
    rest: list[int] = []
    for gi, (g, mg) in enumerate(zip(groups, merged, strict=True)):
        if not mg and g.rank > 0:
            rest.extend(h.group_samples[gi])
            continue
        if g.rank == 0:
            wg = wbase
        else:
            key = (id(lora_a), g.key, prec)
            wg = cache.get(key)
            if wg is None:
                wg = _merge(weight, h.group_items[gi], h.scales, lora_a, lora_bt, mdt)
                fp = _slot_fp(h, lora_a, lora_bt)
                density = gains[gi] / (wg.numel() * wg.element_size())
                if cache.put(st, key, wg, {s: fp(s) for s, _ in g.key}, density):
                    cache.credit.pop(key, None)
                elif cal is not None:
                    # no room worth taking: use it this once, then run unmerged until the
                    # gains have paid ten builds (bounds the rebuild cost to ~10 %)
                    cache.credit[key] = -10 * _planner.merge_time(cal, k, n, g.rank)
        for r0, r1 in h.group_runs[gi]:
            _gemm_into(y[r0:r1], xg[r0:r1], wg, bg)
    if rest:
        # unmerged groups: their rows gathered (a view when contiguous) through the core in ct,
        # rounded once when written into y
        sp, spans = _subplan(h, tuple(sorted(rest)), ct, x.device)
        if len(spans) == 1:
            xs = x[spans[0][0] : spans[0][1]].to(ct)
        else:
            xs = torch.cat([x[r0:r1] for r0, r1 in spans]).to(ct)
        ys = _unmerged(sp, xs, w32, b32, lora_a, lora_bt, ct, block)
        pos = 0
        for r0, r1 in spans:
            y[r0:r1] = ys[pos : pos + r1 - r0]
            pos += r1 - r0
    _planner.record(
        k,
        n,
        prec,
        len(groups) - n_unmerged - sum(1 for g in groups if not g.rank),
        n_unmerged,
        built,
        hits,
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)
