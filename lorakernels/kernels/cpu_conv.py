"""The cpu backend's k x k LoCon convolution: one pair of convolutions per run of samples.

Semantics: the convolution loop in :mod:`lorakernels.kernels`, computed as::

    for each run of consecutive samples that share a mixture (images r0:r1):
        A = the run's rank rows, concatenated       # [R, C_in, kh, kw], R = summed rank
        t = conv2d(x[r0:r1], A, stride, padding, dilation) * coef   # fp32, never rounded
        y[r0:r1] += conv2d(t, B.T as a 1x1 filter)                 # [C_out, R, 1, 1]

``coef`` holds ``strength * alpha / r`` per rank column. The host-side plan (the bank rows
and coefficients of each run, as device tensors) hangs on the layer's host plan
(:mod:`.hostplan`, the linear layers' too), built once per batch and bank version: a call with
the same batch tensors at the same versions reads none of them and copies nothing.

Numerics: float32 compute for float32/float16/bfloat16 inputs, float64 for float64; the rank
intermediate ``t`` stays in that dtype; one rounding to ``x.dtype`` at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import BankTensors, BatchTensors, ConvMeta, LoRAArgs, compute_dtype, hostplan


def _runs(bank: BankTensors, batch: BatchTensors, ct: torch.dtype):  # noqa: ANN202
    """``[(image0, image1, bank_rows, coef)]`` per run of samples sharing a mixture, kept on
    the layer's host plan (:func:`.hostplan.host`: cached per batch and bank version, so a
    steady batch reads no tensor on later calls)."""
    tensors = (*batch, bank.slot_start, bank.slot_rank, bank.slot_scale)
    h = hostplan.host(tensors, ct, bank.lora_a, bank.lora_bt)
    runs = h.derived.get("conv")
    if runs is None:
        runs = h.derived["conv"] = _build_runs(h.rows, h.per_sample, ct, bank.lora_a.device)
    return runs


def _build_runs(rows, per_sample, ct: torch.dtype, dev: torch.device) -> list:
    runs, s = [], 0
    while s < len(per_sample):
        end = s + 1
        while end < len(per_sample) and per_sample[end] == per_sample[s]:
            end += 1
        if per_sample[s] and rows[end] > rows[s]:
            index = [i for st, r, _ in per_sample[s] for i in range(st, st + r)]
            coef = [c for _, r, c in per_sample[s] for _ in range(r)]
            runs.append(
                (
                    rows[s],
                    rows[end],
                    torch.tensor(index, dtype=torch.long, device=dev),
                    torch.tensor(coef, dtype=ct, device=dev).view(1, -1, 1, 1),
                )
            )
        s = end
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
