"""Host side of the merged/unmerged plan, shared by the backends that execute it (cpu, triton).

What lives here is backend-neutral: it reads the batch and bank tensors on the host, groups
samples, asks :func:`lorakernels.plan.decide` which groups merge, and builds or fetches their
merged weights through :data:`lorakernels.plan.CACHE` (with the ski-rental credit
bookkeeping). What a backend does with the answer (GEMMs per run of rows on the CPU, one
segmented launch on Triton) stays in the backend.

* :func:`host` -> :class:`Host`: groups of samples sharing a mixture, their rows and summed
  ranks. Cached per batch and bank *version*: the key is the tensors' identities and
  ``_version`` counters (a hit reads no tensor; a miss reads them with ``.tolist()``, which
  on CUDA waits for the device once per new batch content).
* :func:`layer_state` -> the layer's :class:`~lorakernels.plan.MergedCache` state, validated
  against ``W`` and the bank (drops every entry whose inputs changed) before any lookup.
* :func:`plan_groups` -> :class:`GroupPlan`: per group merged or not, the merged weights of
  the merged groups, and the counts :func:`lorakernels.plan.record` takes.
* :func:`merge` builds one merged weight: ``W + Σ w·s·B @ A`` computed in float32 (``B``, ``A``
  upcast, one ``addmm``), stored in the dtype the backend's merged GEMM reads (float32 for
  the cpu backend's upcast path; ``x.dtype`` for native half GEMMs and for the Triton kernel,
  rounded once).

Semantics of a group (``h.group_items[g]``): ``((slot, start, rank, strength), ...)`` sorted
by slot, adapters of rank 0 in this layer left out; ``h.groups[g].key`` is
``((slot, strength), ...)``, the merged cache's mixture key. ``h.group_runs[g]`` lists the
group's runs of consecutive rows ``(row0, row1)``.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import plan as _planner

__all__ = [
    "DTYPE_NAME",
    "GroupPlan",
    "Host",
    "eager_mode",
    "gather_rows",
    "host",
    "layer_state",
    "merge",
    "plan_groups",
    "sample_spans",
    "scatter_rows",
    "slot_fp",
]


class Host:
    """Host facts of one (batch content, bank content, row count): groups and their rows.

    ``derived``: values a backend builds from these facts (the cpu backend's unmerged
    sub-plans, the triton backend's per-sample segment tensors), keyed by the backend; emptied
    when another layer's bank takes this plan over (their gathered rows are not ours).
    """

    __slots__ = (
        "derived",
        "group_items",
        "group_runs",
        "group_samples",
        "groups",
        "owner",
        "per_sample",
        "ranks",
        "rows",
        "scales",
        "starts",
    )


_HOST: OrderedDict[tuple, Host] = OrderedDict()  # content key -> host plan
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


def _build_host(key: tuple) -> Host:
    rows, ptr, slots, weights, starts, ranks, scales, _ct = key[:8]
    h = Host()
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
    h.derived = {}
    return h


def host(tensors, ct, lora_a: Tensor, lora_bt: Tensor) -> Host:
    """The host plan of ``tensors`` (``(*batch, slot_start, slot_rank, slot_scale)``) for the
    layer whose bank holds ``lora_a``/``lora_bt``; ``ct`` (the compute dtype) is part of the
    key only so that backends' ``derived`` values built in a dtype are not shared."""
    with _HOST_LOCK:
        return _host_unlocked(tensors, ct, lora_a, lora_bt)


def _host_unlocked(tensors, ct, lora_a: Tensor, lora_bt: Tensor) -> Host:
    """Fast path: the same tensor objects at the same ``_version`` counters (every in-place
    write bumps them) map to the cached plan without reading them; otherwise read them
    (``.tolist()``) and look the content up."""
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
        h = _build_host(ckey)
        _HOST[ckey] = h
        if len(_HOST) > _HOST_SIZE:
            _HOST.popitem(last=False)
    else:
        _HOST.move_to_end(ckey)
    if h.owner is None or any(
        r() is not t for r, t in zip(h.owner, (lora_a, lora_bt), strict=True)
    ):
        # a new layer reusing a dead one's ids: its derived values are not ours
        h.owner = (weakref.ref(lora_a), weakref.ref(lora_bt))
        h.derived = {}
    _FAST[fast] = (tuple(weakref.ref(t) for t in owned), ckey)
    if len(_FAST) > _HOST_SIZE:
        _FAST.popitem(last=False)
    return h


def slot_fp(h: Host, lora_a: Tensor, lora_bt: Tensor):
    """``fp(slot) -> fingerprint``: rank, scale and exact hashes of the slot's ``A`` and
    ``B.T`` rows (what a cached merged weight of that slot was built from)."""

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


def merge(weight: Tensor, items, scales, lora_a, lora_bt, store: torch.dtype) -> Tensor:
    """``W + Σ w·s·B @ A`` in float32, stored as ``store`` (see lorakernels.plan: numerics).

    ``items``: a group's ``((slot, start, rank, strength), ...)``; ``scales``: per slot."""
    bc = torch.cat([lora_bt[st : st + r].float().T * (w * scales[k]) for k, st, r, w in items], 1)
    ac = torch.cat([lora_a[st : st + r].float() for _, st, r, _ in items], 0)
    return torch.addmm(weight.float(), bc, ac).to(store)


def layer_state(h: Host, weight: Tensor, lora_a: Tensor, lora_bt: Tensor, tensors):
    """The merged cache's state of this layer, validated: entries built from another ``W``
    or from bank rows that changed since are dropped before anything is looked up."""
    cache = _planner.CACHE
    st = cache.layer(lora_a)
    cache.validate(
        st,
        _planner.weight_stamp(weight),
        _planner.bank_stamp(lora_a, lora_bt, *tensors[4:]),
        slot_fp(h, lora_a, lora_bt),
    )
    return st


@dataclass
class GroupPlan:
    """The planner's answer for one call.

    Attributes:
        merged: per group, whether it runs merged (groups without adapters: False).
        weights: per group, its merged weight (``[N, K]`` in the ``store`` dtype) where
            ``merged``, else ``None``.
        keys: per group, its merged-cache key ``(id(lora_a), mixture, tag)``.
        built, hits: merged weights built this call / taken from the cache.
        n_merged, n_unmerged: groups with adapters that run merged / unmerged.
    """

    merged: list[bool]
    weights: list[Tensor | None]
    keys: list[tuple]
    built: int
    hits: int
    n_merged: int
    n_unmerged: int


def plan_groups(
    h: Host,
    weight: Tensor,
    lora_a: Tensor,
    lora_bt: Tensor,
    st,
    *,
    mode: str,
    cal: _planner.Calibration | None,
    tag: str,
    cost_prec: str,
    half: bool,
    store: torch.dtype,
    unmerged_prec: str = "fp32",
    rows_per_item: int = 1,
    pack=None,
) -> GroupPlan:
    """Decide per group and produce the merged groups' weights.

    ``mode``: the plan in force (``"auto"`` needs ``cal``). ``tag``: the precision name in
    the cache key (merged weights of one layer and mixture are shared by every call that
    stores them in the same dtype). ``cost_prec``/``half``: passed to
    :func:`lorakernels.plan.decide` (the GEMM precision priced, and whether unmerged rows
    pay an upcast); ``unmerged_prec``: the unmerged rows' base GEMM precision. ``st``:
    :func:`layer_state` (validated this call). ``rows_per_item``: GEMM rows per item of
    ``row_ptr`` (a convolution's output pixels per image; 1 for linear layers). ``pack``:
    applied to a merged weight once, when built (the cpu backend's oneDNN layout, see
    kernels/cpu_gemm.py); what is cached and returned is its result (``tag`` must say so).

    Groups that ran unmerged add their modelled gain to their credit; a weight that does not
    fit the cache is used this once and its key is charged ten builds (so it is rebuilt at
    most every ten calls' worth of gains, ~10 % overhead).
    """
    groups = h.groups
    k, n = weight.shape[1], weight.shape[0]
    keys = [(id(lora_a), g.key, tag) for g in groups]
    cache = _planner.CACHE
    none = [None] * len(groups)
    if mode == "unmerged" or not any(g.rank for g in groups):
        n_un = sum(1 for g in groups if g.rank)
        return GroupPlan([False] * len(groups), none, keys, 0, 0, 0, n_un)
    cached = [g.rank > 0 and cache.has(kk) for g, kk in zip(groups, keys, strict=True)]
    credit = [cache.credit.get(kk, 0.0) for kk in keys]
    priced = groups
    if rows_per_item != 1:
        priced = [_planner.Group(g.key, g.rows * rows_per_item, g.runs, g.rank) for g in groups]
    merged, gains = _planner.decide(
        cal, priced, k, n, cost_prec, half, cached, credit, mode, unmerged_prec
    )
    with cache.lock:
        for kk, gain, mg in zip(keys, gains, merged, strict=True):
            if gain and not mg:
                cache.credit[kk] = cache.credit.get(kk, 0.0) + gain
                cache.credit.move_to_end(kk)
        while len(cache.credit) > 4096:
            cache.credit.popitem(last=False)
    hits = sum(1 for mg, c in zip(merged, cached, strict=True) if mg and c)
    built = sum(1 for mg, c in zip(merged, cached, strict=True) if mg and not c)
    weights: list[Tensor | None] = list(none)
    for gi, (g, mg) in enumerate(zip(groups, merged, strict=True)):
        if not mg or g.rank == 0:
            continue
        key = keys[gi]
        wg = cache.get(key)
        if wg is None:
            wg = merge(weight, h.group_items[gi], h.scales, lora_a, lora_bt, store)
            if pack is not None:
                wg = pack(wg)
            fp = slot_fp(h, lora_a, lora_bt)
            density = gains[gi] / (wg.numel() * wg.element_size())
            if cache.put(st, key, wg, {s: fp(s) for s, _ in g.key}, density):
                cache.credit.pop(key, None)
            elif cal is not None:
                # no room worth taking: use it this once, then run unmerged until the
                # gains have paid ten builds (bounds the rebuild cost to ~10 %)
                cache.credit[key] = -10 * _planner.merge_time(cal, k, n, g.rank)
        weights[gi] = wg
    n_unmerged = sum(1 for g, mg in zip(groups, merged, strict=True) if not mg and g.rank)
    n_merged = sum(1 for g, mg in zip(groups, merged, strict=True) if mg and g.rank)
    return GroupPlan(merged, weights, keys, built, hits, n_merged, n_unmerged)


def sample_spans(h: Host, samples: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Rows of ``samples`` (sorted) as maximal contiguous ``(row0, row1)`` spans, cached on
    the host plan: what a backend gathers to run a subset of samples together."""
    key = ("spans", samples)
    got = h.derived.get(key)
    if got is None:
        spans: list[list[int]] = []
        for s in samples:
            r0, r1 = h.rows[s], h.rows[s + 1]
            if spans and spans[-1][1] == r0:
                spans[-1][1] = r1
            elif r1 > r0:
                spans.append([r0, r1])
        got = h.derived[key] = tuple((r0, r1) for r0, r1 in spans)
    return got


def gather_rows(x: Tensor, spans) -> Tensor:
    """``x``'s rows (first dimension) of ``spans``, concatenated; a view for one span."""
    return (
        x[spans[0][0] : spans[0][1]] if len(spans) == 1 else torch.cat([x[a:b] for a, b in spans])
    )


def scatter_rows(y: Tensor, ys: Tensor, spans) -> None:
    """Write ``ys`` (the rows :func:`gather_rows` took) back into ``y``'s ``spans``."""
    pos = 0
    for r0, r1 in spans:
        y[r0:r1] = ys[pos : pos + r1 - r0]
        pos += r1 - r0


DTYPE_NAME = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}
DTYPE_NAME[torch.float16] = "fp16"


def eager_mode(x: Tensor, weight: Tensor, bias: Tensor | None, ct: torch.dtype) -> tuple[str, bool]:
    """``(plan mode, grad)`` of an eager cpu call: ``"unmerged"`` when autograd records the
    call (a cached merged weight is not connected to ``W``), inside a backward pass, and for
    float64 (the oracle's dtype); else the plan in force (:func:`lorakernels.plan.resolve_plan`)."""
    grad = (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ) or in_backward()
    if grad or ct == torch.float64:
        return "unmerged", grad
    return _planner.resolve_plan(), grad


def in_backward() -> bool:
    """``True`` inside an autograd backward pass. The custom op's input gradient is the op on
    a fresh ``W.T`` copy whose cache stamp (address, version 0) can repeat with other
    contents after an optimizer step, so such calls never merge."""
    return torch._C._current_graph_task_id() != -1
