"""The cpu backend's convolutions: planned per group of samples, computed in NCHW.

Semantics: the convolution loop in :mod:`lorakernels.kernels` (the base ``conv2d`` included).
Samples sharing a mixture form a group (:mod:`.hostplan`, as for linear layers, with
``row_ptr`` counting images); :func:`lorakernels.plan.decide` prices each group with the
layer as a GEMM of ``K = C_in*kh*kw`` and ``N = C_out`` over the group's output pixels, and
the groups run

* **merged**: ``y[images] = conv2d(x[images], W + Σ w·s·B @ A, b)`` per run of the group's
  images, the merged weight cached across calls (:data:`lorakernels.plan.CACHE`; numerics in
  :mod:`lorakernels.plan`), or
* **unmerged**: one base ``conv2d`` over all their images, then the LoRA term added:

  - pointwise (1x1, stride 1, no padding; SD1.5's ``proj_in``/``proj_out``): two batched
    GEMMs on the NCHW pixels, no layout copies::

        A_i = the rank rows of image i's mixture, padded to R_max     # [n, R_max, C_in]
        t = bmm(A_i, x.view(n, C_in, H*W))                           # fp32, never rounded
        y.view(n, C_out, H*W) += bmm(B_i * coef, t)                   # B_i [n, C_out, R_max]

  - k x k (LoCon): per run of images sharing a mixture,
    ``t = conv2d(x, A) * coef`` (fp32) and ``y += conv2d(t, B as a 1x1 filter)``.

Why NCHW: running a 1x1 convolution as a linear layer over pixel rows costs an NCHW -> rows
copy of ``x`` and a copy back of ``y`` per call; SD1.5's 32 pointwise layers took 1.5-2.5x
their base that way at 32² latents on a 2-core EPYC (890 ms against 415 for the base convs).

The host facts (groups, gathered rows, coefficients) are cached on the layer's host plan per
batch and bank version: a call with the same batch tensors reads none of them and builds no
device tensor.

Numerics: float32 compute of the LoRA term for float32/float16/bfloat16 inputs, float64 for
float64; the rank intermediate ``t`` never rounded. The base ``conv2d`` and merged groups run
in ``x.dtype`` (for half inputs: the base rounded once, the float32 LoRA term added, rounded
again; merged weights rounded once to ``x.dtype``). Inputs that autograd records, backward
passes and float64 run unmerged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import plan as _planner
from . import ConvMeta, LoRAArgs, compute_dtype, hostplan

_MAX_PAD_WASTE = 1.5  # pad every image to R_max only while that is < 1.5x the real work


def _out_pixels(x: Tensor, conv: ConvMeta) -> int:
    """``H' * W'`` of the output (the planner's rows per image)."""
    if conv.padding == "same":
        return x.shape[2] * x.shape[3]
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    size = 1
    for i, k in enumerate((conv.kh, conv.kw)):
        span = conv.dilation[i] * (k - 1) + 1
        size *= max(0, (x.shape[2 + i] + 2 * pad[i] - span) // conv.stride[i] + 1)
    return size


# ---------------------------------------------------------------------- unmerged LoRA term
def _runs(h: hostplan.Host, images: tuple[int, ...] | None, ct, dev) -> list:
    """``[(image0, image1, bank_rows, coef)]`` per run of consecutive samples sharing a
    mixture, over the samples ``images`` (None: all; indices renumbered to the subset)."""
    key = ("conv-runs", images)
    runs = h.derived.get(key)
    if runs is None:
        samples = range(len(h.per_sample)) if images is None else images
        runs, pos = [], 0
        for s in samples:
            n_img = h.rows[s + 1] - h.rows[s]
            items = h.per_sample[s]
            if items and n_img:
                if runs and runs[-1][4] == items and runs[-1][1] == pos:
                    runs[-1][1] = pos + n_img
                else:
                    runs.append([pos, pos + n_img, None, None, items])
            pos += n_img
        for run in runs:
            items = run.pop()
            index = [i for st, r, _ in items for i in range(st, st + r)]
            coef = [c for _, r, c in items for _ in range(r)]
            run[2] = torch.tensor(index, dtype=torch.long, device=dev)
            run[3] = torch.tensor(coef, dtype=ct, device=dev)
        runs = h.derived[key] = [tuple(r) for r in runs]
    return runs


def _pointwise_rows(h, images, runs, lora_a, lora_bt, ct):
    """``(i0, i1, A, B)`` for images ``i0:i1`` (first to last with an adapter): per image its
    ``A`` rows ``[n, R_max, C_in]`` and ``B * coef`` ``[n, C_out, R_max]`` (padding columns
    zero), or ``None`` when padding would waste more than 1.5x."""
    key = ("conv-pointwise", images)
    if key in h.derived:
        return h.derived[key]
    rmax = max(len(i) for _, _, i, _ in runs)
    i0, i1 = runs[0][0], runs[-1][1]
    real = sum((r1 - r0) * len(i) for r0, r1, i, _ in runs)
    got = None
    if (i1 - i0) * rmax <= _MAX_PAD_WASTE * real:
        a = torch.zeros(i1 - i0, rmax, lora_a.shape[1], dtype=ct, device=lora_a.device)
        b = torch.zeros(i1 - i0, lora_bt.shape[1], rmax, dtype=ct, device=lora_a.device)
        for r0, r1, index, coef in runs:
            r = len(index)
            a[r0 - i0 : r1 - i0, :r] = lora_a.index_select(0, index).to(ct)
            b[r0 - i0 : r1 - i0, :, :r] = (lora_bt.index_select(0, index).to(ct) * coef[:, None]).T
        got = (i0, i1, a, b)
    h.derived[key] = got
    return got


def _add_lora(out: Tensor, x: Tensor, h, images, lora_a, lora_bt, conv: ConvMeta, ct) -> None:
    """``out += LoRA term`` in place (``out`` in ``ct``, images of ``x`` renumbered as in
    :func:`_runs`)."""
    runs = _runs(h, images, ct, x.device)
    if not runs:
        return
    if conv.pointwise and x.is_contiguous() and out.is_contiguous():
        rows = _pointwise_rows(h, images, runs, lora_a, lora_bt, ct)
        if rows is not None:
            i0, i1, a, b = rows
            p = x.shape[2] * x.shape[3]
            t = torch.bmm(a, x[i0:i1].to(ct).view(i1 - i0, x.shape[1], p))
            out[i0:i1].view(i1 - i0, -1, p).baddbmm_(b, t)
            return
    for r0, r1, index, coef in runs:
        filt = lora_a.index_select(0, index).to(ct).view(-1, conv.c_in, conv.kh, conv.kw)
        t = F.conv2d(x[r0:r1].to(ct), filt, None, conv.stride, conv.padding, conv.dilation)
        t.mul_(coef.view(1, -1, 1, 1))  # the rank intermediate, fp32
        up = lora_bt.index_select(0, index).to(ct).T
        out[r0:r1] += F.conv2d(t, up.reshape(up.shape[0], -1, 1, 1))


def _unmerged(x, weight, bias, h, images, lora_a, lora_bt, conv: ConvMeta, ct) -> Tensor:
    """Base ``conv2d`` in ``x.dtype`` plus the LoRA term, in ``ct``."""
    geom = (conv.stride, conv.padding, conv.dilation)
    out = F.conv2d(x, weight, bias, *geom).to(ct)  # in place below when already ct
    _add_lora(out, x, h, images, lora_a, lora_bt, conv, ct)
    return out


# ---------------------------------------------------------------------- entry
def multi_lora_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs, conv: ConvMeta
) -> Tensor:
    """``[N_img, C_in, H, W] -> conv2d(x, weight, bias) + LoRA terms``; see the module doc."""
    bank = lora.bank  # the plan reads exact values from the (host) tensors, not lora.meta
    lora_a, lora_bt = bank.lora_a, bank.lora_bt
    ct = compute_dtype(x.dtype)
    tensors = (*lora.batch, bank.slot_start, bank.slot_rank, bank.slot_scale)
    h = hostplan.host(tensors, ct, lora_a, lora_bt)
    geom = (conv.stride, conv.padding, conv.dilation)
    groups = h.groups
    if not any(g.rank for g in groups):
        return F.conv2d(x, weight, bias, *geom)
    mode, _ = hostplan.eager_mode(x, weight, bias, ct)
    w2 = weight.reshape(weight.shape[0], -1)  # [C_out, K]: the merged cache's view
    n, k = w2.shape
    prec = hostplan.DTYPE_NAME[x.dtype]
    if mode == "unmerged":
        _planner.record(k, n, prec, 0, sum(1 for g in groups if g.rank), 0, 0, "conv2d")
        return _unmerged(x, weight, bias, h, None, lora_a, lora_bt, conv, ct).to(x.dtype)
    cal = _planner.calibration() if mode == "auto" else None
    # the GEMM rate that prices a conv in x.dtype (a CPU without native half GEMMs has no
    # measured half rate: price it as float32)
    cost = prec if cal is None or prec in cal.gemm_flops else "fp32"
    # stamped on the parameter itself: w2 is a copy for a channels-last weight, whose address
    # and version 0 could repeat after an in-place edit of the parameter
    st = hostplan.layer_state(h, weight, lora_a, lora_bt, tensors)
    gp = hostplan.plan_groups(
        h,
        w2,
        lora_a,
        lora_bt,
        st,
        mode=mode,
        cal=cal,
        tag=prec,
        cost_prec=cost,
        half=x.dtype != ct,
        store=x.dtype,
        unmerged_prec=cost,
        rows_per_item=_out_pixels(x, conv),
    )
    if not gp.n_merged:
        _planner.record(k, n, prec, 0, gp.n_unmerged, 0, 0, "conv2d")
        return _unmerged(x, weight, bias, h, None, lora_a, lora_bt, conv, ct).to(x.dtype)
    y = None
    rest: list[int] = []
    for gi, (g, mg) in enumerate(zip(groups, gp.merged, strict=True)):
        if not mg and g.rank > 0:
            rest.extend(h.group_samples[gi])
            continue
        wg = weight if g.rank == 0 else gp.weights[gi].view_as(weight)
        for r0, r1 in h.group_runs[gi]:
            part = F.conv2d(x[r0:r1], wg, bias, *geom)
            if y is None:  # the output's shape and memory format are the conv's own
                y = torch.empty(
                    (x.shape[0], *part.shape[1:]),
                    dtype=part.dtype,
                    device=part.device,
                    memory_format=_format(part),
                )
            y[r0:r1] = part
    if y is None:  # merged groups without images: nothing but the unmerged rows
        return _unmerged(x, weight, bias, h, None, lora_a, lora_bt, conv, ct).to(x.dtype)
    if rest:
        samples = tuple(sorted(rest))
        spans = hostplan.sample_spans(h, samples)
        xs = hostplan.gather_rows(x, spans)
        ys = _unmerged(xs, weight, bias, h, samples, lora_a, lora_bt, conv, ct)
        hostplan.scatter_rows(y, ys, spans)
    _planner.record(k, n, prec, gp.n_merged, gp.n_unmerged, gp.built, gp.hits, "conv2d")
    return y


def _format(t: Tensor) -> torch.memory_format:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
