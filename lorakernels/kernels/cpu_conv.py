"""The cpu backend's k x k LoCon convolution: one pair of convolutions per run of samples.

Semantics: the convolution loop in :mod:`lorakernels.kernels`, computed as::

    for each run of consecutive samples that share a mixture (images r0:r1):
        A = the run's rank rows, concatenated       # [R, C_in, kh, kw], R = summed rank
        t = conv2d(x[r0:r1], A, stride, padding, dilation) * coef   # fp32, never rounded
        y[r0:r1] += conv2d(t, B.T as a 1x1 filter)                 # [C_out, R, 1, 1]

``coef`` holds ``strength * alpha / r`` per rank column. The host-side plan (the bank rows
and coefficients of each run, as device tensors) is built once per distinct batch and bank
content and cached, so a call makes no host-to-device copy: the layer sees the same batch at
every denoising step. Building the cache key reads the small index tensors on the host, which
is free on CPU tensors (the only ones this backend accepts).

Numerics: float32 compute for float32/float16/bfloat16 inputs, float64 for float64; the rank
intermediate ``t`` stays in that dtype; one rounding to ``x.dtype`` at the end.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from . import BankTensors, BatchTensors, ConvMeta, LoRAArgs, compute_dtype

_RUNS: OrderedDict[tuple, list[tuple[int, int, Tensor, Tensor]]] = OrderedDict()
_RUNS_SIZE = 256  # one entry per (conv layer content, batch) in use; a few small tensors each


def _runs(bank: BankTensors, batch: BatchTensors, ct: torch.dtype):  # noqa: ANN202
    """``[(image0, image1, bank_rows, coef)]`` per run of samples sharing a mixture (cached)."""
    ptr = tuple(batch.entry_ptr.tolist())
    used = (batch.entry_slot[: ptr[-1]], batch.entry_weight[: ptr[-1]])
    rows, slots, weights, starts, ranks, scales = (
        tuple(t.tolist())
        for t in (batch.row_ptr, *used, bank.slot_start, bank.slot_rank, bank.slot_scale)
    )
    key = (rows, ptr, slots, weights, starts, ranks, scales, ct, str(bank.lora_a.device))
    runs = _RUNS.get(key)
    if runs is not None:
        _RUNS.move_to_end(key)
        return runs
    per_sample = [
        tuple(
            (starts[slots[e]], ranks[slots[e]], weights[e] * scales[slots[e]])
            for e in range(ptr[s], ptr[s + 1])
            if ranks[slots[e]]
        )
        for s in range(len(rows) - 1)
    ]
    runs, s = [], 0
    while s < len(per_sample):
        end = s + 1
        while end < len(per_sample) and per_sample[end] == per_sample[s]:
            end += 1
        if per_sample[s] and rows[end] > rows[s]:
            index = [i for st, r, _ in per_sample[s] for i in range(st, st + r)]
            coef = [c for _, r, c in per_sample[s] for _ in range(r)]
            dev = bank.lora_a.device
            runs.append(
                (
                    rows[s],
                    rows[end],
                    torch.tensor(index, dtype=torch.long, device=dev),
                    torch.tensor(coef, dtype=ct, device=dev).view(1, -1, 1, 1),
                )
            )
        s = end
    _RUNS[key] = runs
    if len(_RUNS) > _RUNS_SIZE:
        _RUNS.popitem(last=False)
    return runs


def multi_lora_conv2d(x: Tensor, base: Tensor, lora: LoRAArgs, conv: ConvMeta) -> Tensor:
    """``[N_img, C_in, H, W] -> base + LoRA terms``; see :mod:`lorakernels.kernels`."""
    bank = lora.bank  # the plan reads exact values from the (host) tensors, not lora.meta
    ct = compute_dtype(x.dtype)
    runs = _runs(bank, lora.batch, ct)
    out = base.to(ct)  # ``base`` itself when it is already in ct: updated in place, no copy
    for r0, r1, index, coef in runs:
        filt = bank.lora_a.index_select(0, index).to(ct)
        filt = filt.view(-1, conv.c_in, conv.kh, conv.kw)
        t = F.conv2d(x[r0:r1].to(ct), filt, None, conv.stride, conv.padding, conv.dilation)
        t.mul_(coef)  # the rank intermediate, fp32
        up = bank.lora_bt.index_select(0, index).to(ct).T
        out[r0:r1] += F.conv2d(t, up.reshape(up.shape[0], -1, 1, 1))
    return out.to(x.dtype)
