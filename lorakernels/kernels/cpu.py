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
  key is the tensors' identities and ``_version`` counters (no ``.tolist()`` on a hit). The
  grouping, the decisions and the merged weights come from :mod:`.hostplan`, which the
  triton backend shares; this module keeps the unmerged core and the GEMMs.

Which GEMM (:mod:`.cpu_gemm`): torch's, or oneDNN's with the weight reordered once into
oneDNN's layout and cached, per precision: for ``W`` where the calibration measured oneDNN at
least 1.25x faster, for merged weights where it measured it faster at all (packed when built,
so no extra memory). On a 2-core AMD EPYC torch's float32 GEMM (MKL's sgemm) ran at
~170 GFLOP/s and oneDNN's at ~410-480, so there every float32 GEMM of this backend goes to
oneDNN (the unmerged rows' base GEMM with the LoRA term added in its epilogue); the thin
LoRA GEMMs stay torch's (``bmm`` has no prepacked form). Row blocks apply to torch's GEMM only.

Numerics: float32 compute for float32/float16/bfloat16 inputs, float64 for float64; the rank
intermediate ``t`` is float32 (or float64); one rounding to ``x.dtype`` at the end.

Half precision by ISA (issue 10 B, issue 13): the native half GEMM (``F.linear`` in the
dtype) runs where the CPU has the instructions (avx512_bf16/amx_bf16, avx512_fp16/amx_fp16)
AND the calibration measured it faster at this shape than the float32 GEMM plus the
conversions (``plan.choose_precision``); elsewhere everything computes in float32 (``x``
upcast, ``W`` upcast once and cached per layer) and rounds once. Where native wins:

* *merged* groups and layers where no sample uses an adapter: one native GEMM, one rounding
  (merged weights rounded once, see :mod:`lorakernels.plan`);
* *unmerged* rows: their base GEMM native (float32 accumulation, rounded once to the dtype:
  torch's CPU GEMM has no float32 output for half inputs), then the float32 ``bias + LoRA
  term`` (rank intermediate float32) added in float32 and rounded once more: two roundings,
  at most one ulp of ``y`` plus half an ulp of the base, where plain PyTorch in bf16 (PEFT)
  rounds the base, the rank intermediate, the LoRA term and the sum.

Measured: an avx512_bf16 Xeon without AMX (oneDNN's avx512_core_bf16 brgemm, 1 thread) ran
bf16 1.6-2.6x slower than float32 at SD shapes, so bf16 stays upcast there; a 2-core
avx512_bf16 EPYC runs bf16 GEMMs 4.5x faster than float32 (~750 vs ~170 GFLOP/s), where the
native base took the 77-row text layer's unmerged rows from 4.3x to 2.1x the bf16 base. The
float32 LoRA term then bounds it: its FLOPs (7 % of the base's there) run at the float32 rate,
0.31x the bf16 base's time. Where bf16 is emulated it is 3-4x slower and never chosen.

Autograd: when ``x`` or ``weight`` requires grad (grad mode on), everything runs unmerged (a
cached merged weight is not connected to ``W``), and so does every call inside a backward pass
(:func:`.hostplan.in_backward`). float64 always runs unmerged (it is the oracle's dtype).

Padding: the batched form pads every sample to the largest summed rank in the batch; it is
used only while the padded work stays under 1.5x the real work, else the per-run form runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import plan as _planner
from . import LoRAArgs, compute_dtype, cpu_gemm, hostplan
from .cpu_conv import multi_lora_conv2d

__all__ = ["multi_lora_conv2d", "multi_lora_linear", "unavailable_reason"]

_MAX_PAD_WASTE = 1.5
_DTYPE_NAME = hostplan.DTYPE_NAME


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


def _blocks_pay(plan: _Plan, n: int, block: int) -> bool:
    """Row blocks only where the probe measured them (``plan.Calibration.row_block``, at
    N = 320): an output block no wider than that, in samples at least a block long. Measured
    on a 2-core EPYC, blocks of 1024 rows: 0.94-0.97x the one-pass form at N = 320, 1.04-1.12x
    at N = 1280-5120 (y blocks past the caches) and 1.02x for 256-row samples (the base GEMM
    split per sample)."""
    if n > _PROBE_ROWS[3]:
        return False
    if plan.kind == "batched":
        return plan.rows[1] - plan.rows[0] >= block
    return plan.kind == "runs" and all(r1 - r0 >= block for r0, r1, _, _ in plan.runs)


def _unmerged_native(plan: _Plan, x, w, b, lora_a, lora_bt, ct, pw=None) -> Tensor:
    """The unmerged rows with the base GEMM native in ``x.dtype`` (bf16/fp16, ``w`` in that
    dtype; ``pw``: ``w`` packed for oneDNN, then used instead): ``x @ w.T`` accumulated in
    float32 and rounded once to ``x.dtype`` by the GEMM, added in float32 to ``bias + LoRA
    term`` (float32, rank intermediate never rounded). Returns float32 ``[M, N]``; the
    caller's cast rounds a second time (module docstring)."""
    base = x @ w.T if pw is None else cpu_gemm.linear(x, pw, None)
    if plan.kind == "none":
        return base.float() if b is None else torch.add(b, base)
    y = _lora_term(plan, x.to(ct), lora_a, lora_bt, ct, b)
    return y.add_(base)


def _unmerged(plan: _Plan, xc, w, b, lora_a, lora_bt, ct, block: int, pw=None) -> Tensor:
    """``x @ w.T + b + LoRA term`` for the plan's rows, in ``ct``. ``pw``: ``w`` packed for
    oneDNN (kernels/cpu_gemm.py), then the base GEMM runs there and rows are not blocked (the
    row-block probe timed torch's GEMM)."""
    if plan.kind == "none":
        if pw is not None:
            return cpu_gemm.linear(xc, pw, b)
        return torch.addmm(b, xc, w.T) if b is not None else xc @ w.T
    if pw is None and block and xc.shape[0] > 2 * block and _blocks_pay(plan, w.shape[0], block):
        return _blocked(plan, xc, w, b, lora_a, lora_bt, ct, block)
    # LoRA term first, then the base GEMM accumulates onto it (beta=1, or oneDNN's "add"
    # epilogue): the GEMM reads y while it is compute-bound, which hides the pass over y that
    # a separate "y += t @ B" would cost (measured 1.13 vs 1.21 x base at (4096, 320, 320))
    y = _lora_term(plan, xc, lora_a, lora_bt, ct, b)
    if pw is not None:
        return cpu_gemm.linear_add(xc, pw, y)
    y.addmm_(xc, w.T)
    return y


# ---------------------------------------------------------------------- host plan
def _subplan(h: hostplan.Host, samples: tuple[int, ...] | None, ct, device):
    """``(plan, rows slices)`` of the unmerged core over ``samples`` (None: all samples),
    cached on the host plan (its gathered rows are this layer's, see ``Host.derived``)."""
    dkey = ("cpu-unmerged", samples)
    sp = h.derived.get(dkey)
    if sp is None:
        if samples is None:
            sp = (_build_plan(h.rows, h.per_sample, ct, device), None)
        else:
            rows = [0]
            for s in samples:
                rows.append(rows[-1] + h.rows[s + 1] - h.rows[s])
            per = [h.per_sample[s] for s in samples]
            sp = (_build_plan(tuple(rows), per, ct, device), hostplan.sample_spans(h, samples))
        h.derived[dkey] = sp
    return sp


# ---------------------------------------------------------------------- merged weights
def _gemm_into(y: Tensor, x: Tensor, w: Tensor, b: Tensor | None, onednn: bool) -> None:
    """``y = x @ W.T + b``; ``w`` is ``W``, or ``W`` packed when ``onednn`` (whose op has no
    ``out=``: one copy of the run's output, ~1 % of its GEMM at SD1.5's 320-wide layers)."""
    if onednn:
        y.copy_(cpu_gemm.linear(x, w, b))
    elif b is not None:
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
    h = hostplan.host(tensors, ct, lora_a, lora_bt)
    m, k = x.shape
    n = weight.shape[0]
    groups = h.groups
    active = any(g.rank for g in groups)
    mode, grad = hostplan.eager_mode(x, weight, bias, ct)
    half = x.dtype in (torch.bfloat16, torch.float16)
    cal = None
    if not grad and ct != torch.float64:  # the plan, the precision, the GEMM, the row block
        cal = _planner.calibration()
    # the half-precision GEMMs run per run of a group's rows when adapters are active (the
    # crossover depends on rows: upcast wins at 8192 x 320 x 320, native at 65536)
    m_gemm = max((r1 - r0 for runs in h.group_runs for r0, r1 in runs), default=m) if active else m
    native = (
        half and cal is not None and _planner.choose_precision(cal, x.dtype, m_gemm, k, n) != "fp32"
    )
    prec = _DTYPE_NAME.get(x.dtype if native else ct, "fp32")
    # unmerged rows share one base GEMM over all their rows: native where measured faster at
    # that row count (a 2-core avx512_bf16 EPYC: bf16 4.5x the float32 rate at SD shapes)
    native_un = (
        half
        and active
        and cal is not None
        and (native and m_gemm == m or _planner.choose_precision(cal, x.dtype, m, k, n) != "fp32")
    )
    un_prec = _DTYPE_NAME[x.dtype] if native_un else "fp32"
    un_dt = x.dtype if native_un else ct
    mdt = x.dtype if native else ct  # merged GEMMs (and rows without adapters) run in mdt
    # oneDNN with a prepacked weight where it measured faster than torch's GEMM (cpu_gemm.py):
    # merged weights at any gain (packed when built, no extra bytes), W only at >= 1.25x (its
    # packed copy costs K·N words); a layer whose packed W does not fit runs torch's GEMM for W
    onednn_mg = cal is not None and _planner.gemm_impl(cal, prec, merged=True) == "onednn"
    pw_un = pw_base = None
    if cal is not None:
        w_impl = _planner.gemm_impl(cal, prec)
        un_impl = w_impl if un_prec == prec else _planner.gemm_impl(cal, un_prec)
        if un_impl == "onednn":
            pw_un = cpu_gemm.PACKED.get(lora_a, weight, un_dt)
        if w_impl == "onednn":
            pw_base = pw_un if un_dt == mdt else cpu_gemm.PACKED.get(lora_a, weight, mdt)
    cache = _planner.CACHE
    st = None
    if not grad and (half or (mode != "unmerged" and active)):
        st = hostplan.layer_state(h, weight, lora_a, lora_bt, tensors)
    if not active and native and pw_base is None:
        return torch.nn.functional.linear(x, weight, bias)  # the base layer itself
    # unmerged rows and upcast merged GEMMs compute in ct: float32 copies of half weights are
    # cached per layer, and not made where no torch GEMM in ct reads them (the copy would be
    # 2x W's bytes)
    w32 = None
    need32 = (not native_un and pw_un is None) or (not native and pw_base is None)
    if weight.dtype == ct or st is None:
        w32 = weight.to(ct)
    elif need32:
        wkey = (id(lora_a), (), "W", ct)
        w32 = cache.get(wkey)
        if w32 is None:
            w32 = weight.to(ct)
            cache.put(st, wkey, w32, {})
    b32 = None if bias is None else bias.to(ct)
    gp = hostplan.plan_groups(
        h,
        weight,
        lora_a,
        lora_bt,
        st,
        mode=mode if active else "unmerged",
        cal=cal,
        tag=prec + ("/onednn" if onednn_mg else ""),
        cost_prec=prec,
        half=half,
        store=mdt,
        unmerged_prec=_DTYPE_NAME[x.dtype] if native_un else "fp32",
        pack=cpu_gemm.pack if onednn_mg else None,
    )
    block = cal.row_block if cal is not None else 0
    if not gp.n_merged and (active or pw_base is None):
        sp, _ = _subplan(h, None, ct, x.device)
        if native_un:
            y = _unmerged_native(sp, x, weight, b32, lora_a, lora_bt, ct, pw_un)
        else:
            y = _unmerged(sp, x.to(ct), w32, b32, lora_a, lora_bt, ct, block, pw_un)
        gemm = "torch" if pw_un is None else "onednn"
        _planner.record(k, n, prec, 0, gp.n_unmerged, 0, 0, gemm)
        return y.to(x.dtype)
    y = torch.empty(m, n, dtype=mdt, device=x.device)
    xg = x.to(mdt)
    wbase = pw_base if pw_base is not None else weight if weight.dtype == mdt else w32
    bg = None if bias is None else bias.to(mdt)
    rest: list[int] = []
    for gi, (g, mg) in enumerate(zip(groups, gp.merged, strict=True)):
        if not mg and g.rank > 0:
            rest.extend(h.group_samples[gi])
            continue
        wg = wbase if g.rank == 0 else gp.weights[gi]
        packed = onednn_mg if g.rank > 0 else pw_base is not None
        for r0, r1 in h.group_runs[gi]:
            _gemm_into(y[r0:r1], xg[r0:r1], wg, bg, packed)
    if rest:
        # unmerged groups: their rows gathered (a view when contiguous) through the core in ct,
        # rounded once when written into y
        sp, spans = _subplan(h, tuple(sorted(rest)), ct, x.device)
        xs = hostplan.gather_rows(x, spans)
        if native_un:
            ys = _unmerged_native(sp, xs, weight, b32, lora_a, lora_bt, ct, pw_un)
        else:
            ys = _unmerged(sp, xs.to(ct), w32, b32, lora_a, lora_bt, ct, block, pw_un)
        hostplan.scatter_rows(y, ys, spans)
    gemm = "onednn" if onednn_mg else "torch"
    _planner.record(k, n, prec, gp.n_merged, gp.n_unmerged, gp.built, gp.hits, gemm)
    return y if y.dtype == x.dtype else y.to(x.dtype)
