"""CPU backend: the base GEMM once over all rows, then the LoRA term per group of samples.

Semantics: the loop in :mod:`lorakernels.kernels`, computed as::

    y = bias + x @ W.T                                    # one GEMM over all M rows
    # equal-length samples: batched over samples
    A_s = rows of every entry of sample s, concatenated   # [S, R_max, K], R_max = max summed rank
    t = bmm(x.view(S, T, K), A_s.transpose(1, 2))          # fp32 [S, T, R_max]
    t *= strength * scale per column (0 on padding columns)
    y.view(S, T, N).baddbmm_(t, B_s)                       # B_s = rows of B.T, [S, R_max, N]
    # packed rows or very uneven ranks: one (shrink, expand) pair per run of consecutive
    # samples that share a mixture

Why this shape: one big GEMM keeps the base at full BLAS efficiency (splitting it per sample
costs 1.3-1.7x at the SD1.5 shapes on our 2-core CPU); the LoRA term is two thin GEMMs whose
cost is dominated by re-reading ``x`` and ``y`` once, which the batched form does in one call
each instead of one call per sample (per-call overhead dominates at 77 text rows).

Numerics: float32 compute for float32/float16/bfloat16 inputs, float64 for float64; the rank
intermediate ``t`` is float32 (or float64); one rounding to ``x.dtype`` at the end. Half
precision inputs are upcast because this CPU class has no native fp16/bf16 GEMM: oneDNN's
emulated bf16 GEMM measured 3-4x slower than fp32 here (fp16: ~10x), so computing in fp32 is
both faster and exact-er. The upcast is skipped for bf16 when the CPU has AMX tiles.

Padding: the batched form pads every sample to the largest summed rank in the batch; it is
used only while the padded work stays under 1.5x the real work, else the per-run form runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import LaunchMeta

_MAX_PAD_WASTE = 1.5


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only (got {device.type})"
    return None


def _native_bf16() -> bool:
    try:
        return bool(torch._C._cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: assume no AMX
        return False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays; bf16 stays on AMX CPUs; everything else computes in float32."""
    if dtype == torch.float64:
        return torch.float64
    if dtype == torch.bfloat16 and _native_bf16():
        return torch.bfloat16
    return torch.float32


def _plan(row_ptr, entry_ptr, entry_slot, entry_weight, slot_start, slot_rank, slot_scale):
    """Host-side plan: per sample, a list of (first bank row, rank, coefficient)."""
    rows = row_ptr.tolist()
    ptr = entry_ptr.tolist()
    e = ptr[-1]
    slots = entry_slot[:e].tolist()
    weights = entry_weight[:e].tolist()
    starts, ranks, scales = slot_start.tolist(), slot_rank.tolist(), slot_scale.tolist()
    per_sample = []
    for s in range(len(rows) - 1):
        items = []
        for j in range(ptr[s], ptr[s + 1]):
            k = slots[j]
            if ranks[k] > 0:
                items.append((starts[k], ranks[k], weights[j] * scales[k]))
        per_sample.append(tuple(items))
    return rows, per_sample


def _batched(xc, y, lora_a, lora_bt, rows, per_sample, ct):
    """The LoRA term for equal-length samples ``s0 .. s1-1`` in two batched GEMMs."""
    active = [s for s, items in enumerate(per_sample) if items]
    s0, s1 = active[0], active[-1] + 1
    rmax = max(sum(r for _, r, _ in per_sample[s]) for s in active)
    idx, coef = [], []
    for s in range(s0, s1):
        row_idx, row_coef = [], []
        for start, r, c in per_sample[s]:
            row_idx.extend(range(start, start + r))
            row_coef.extend([c] * r)
        pad = rmax - len(row_idx)
        # padding columns read bank row 0 (finite) and are zeroed by a 0 coefficient
        idx.extend(row_idx + [0] * pad)
        coef.extend(row_coef + [0.0] * pad)
    n_s = s1 - s0
    t_rows = rows[1] - rows[0]
    index = torch.tensor(idx, dtype=torch.long, device=xc.device)
    a_s = lora_a.index_select(0, index).to(ct).view(n_s, rmax, -1).transpose(1, 2)
    b_s = lora_bt.index_select(0, index).to(ct).view(n_s, rmax, -1)
    xs = xc[rows[s0] : rows[s1]].view(n_s, t_rows, -1)
    t = torch.bmm(xs, a_s.contiguous())
    t.mul_(torch.tensor(coef, dtype=ct, device=xc.device).view(n_s, 1, rmax))
    y[rows[s0] : rows[s1]].view(n_s, t_rows, -1).baddbmm_(t, b_s)


def _per_run(xc, y, lora_a, lora_bt, rows, per_sample, ct):
    """The LoRA term one run of consecutive samples with an identical mixture at a time."""
    s, n = 0, len(per_sample)
    while s < n:
        e = s + 1
        while e < n and per_sample[e] == per_sample[s]:
            e += 1
        items = per_sample[s]
        r0, r1 = rows[s], rows[e]
        if items and r1 > r0:
            if len(items) == 1:
                start, r, c = items[0]
                a = lora_a[start : start + r].to(ct)
                b = lora_bt[start : start + r].to(ct)
                coef = torch.full((r,), c, dtype=ct, device=xc.device)
            else:
                a = torch.cat([lora_a[st : st + r] for st, r, _ in items]).to(ct)
                b = torch.cat([lora_bt[st : st + r] for st, r, _ in items]).to(ct)
                coef = torch.tensor([c for _, r, c in items for _ in range(r)], dtype=ct)
            t = xc[r0:r1] @ a.T
            t.mul_(coef)
            y[r0:r1].addmm_(t, b)
        s = e


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_bt: Tensor,
    slot_start: Tensor,
    slot_rank: Tensor,
    slot_scale: Tensor,
    row_ptr: Tensor,
    entry_ptr: Tensor,
    entry_slot: Tensor,
    entry_weight: Tensor,
    meta: LaunchMeta,
) -> Tensor:
    """``[M, K] -> [M, N]``; see :mod:`lorakernels.kernels` for the argument table."""
    del meta  # the CPU plan reads exact values from the (host) tensors
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    w = weight.to(ct)
    y = torch.addmm(bias.to(ct), xc, w.T) if bias is not None else xc @ w.T
    rows, per_sample = _plan(
        row_ptr, entry_ptr, entry_slot, entry_weight, slot_start, slot_rank, slot_scale
    )
    real = [sum(r for _, r, _ in items) for items in per_sample]
    if not any(real):
        return y.to(x.dtype)
    lengths = {rows[s + 1] - rows[s] for s in range(len(per_sample))}
    active = [s for s, rs in enumerate(real) if rs]
    span = active[-1] + 1 - active[0]
    padded = span * max(real)
    if len(lengths) == 1 and padded <= _MAX_PAD_WASTE * sum(real):
        _batched(xc, y, lora_a, lora_bt, rows, per_sample, ct)
    else:
        _per_run(xc, y, lora_a, lora_bt, rows, per_sample, ct)
    return y.to(x.dtype)
