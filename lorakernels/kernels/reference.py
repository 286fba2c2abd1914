"""Reference backend: readable, differentiable PyTorch; the oracle every other backend meets.

Semantics: exactly the loops in :mod:`lorakernels.kernels` (one sample and one mixture entry
at a time), for the linear layer and the k x k convolution. Computes in float32, or float64
when ``x`` is float64, and rounds once to ``x.dtype``. It reads the batch's device tensors on
the host (``.tolist()``), so it is neither fast nor CUDA-graph safe; it exists to be
obviously right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import BankTensors, BatchTensors, ConvMeta, LoRAArgs, compute_dtype


def _entries(bank: BankTensors, batch: BatchTensors):  # noqa: ANN202 - a private generator
    """``(sample, row0, row1, start, rank, entry)`` per entry with a nonzero rank here."""
    rows = batch.row_ptr.tolist()
    ptr = batch.entry_ptr.tolist()
    starts, ranks = bank.slot_start.tolist(), bank.slot_rank.tolist()
    for s in range(len(rows) - 1):
        for e in range(ptr[s], ptr[s + 1]):
            slot = int(batch.entry_slot[e])
            if ranks[slot]:  # rank 0: the adapter does not touch this layer
                yield s, rows[s], rows[s + 1], starts[slot], ranks[slot], e


def _coef(bank: BankTensors, batch: BatchTensors, e: int, ct: torch.dtype) -> Tensor:
    """``strength * alpha / r`` of entry ``e`` as a device scalar (no host copy)."""
    slot = batch.entry_slot[e].long()
    return batch.entry_weight[e].to(ct) * bank.slot_scale[slot].to(ct)


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs) -> Tensor:
    """``[M, K] -> [M, N]``; see :mod:`lorakernels.kernels` for the argument table."""
    bank, batch = lora.bank, lora.batch  # the reference needs no launch bounds
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    y = xc @ weight.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    # out-of-place per sample, so the result stays differentiable
    pieces = list(y.split(torch.diff(batch.row_ptr).tolist()))
    for s, r0, r1, a, r, e in _entries(bank, batch):
        t = xc[r0:r1] @ bank.lora_a[a : a + r].to(ct).T  # rank intermediate, never rounded
        pieces[s] = pieces[s] + _coef(bank, batch, e, ct) * (t @ bank.lora_bt[a : a + r].to(ct))
    out = torch.cat(pieces, dim=0) if pieces else y
    return out.to(x.dtype)


def multi_lora_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs, conv: ConvMeta
) -> Tensor:
    """``[N_img, C_in, H, W] -> conv2d(x, weight, bias) + LoRA terms``, all in the compute
    dtype, rounded once; see :mod:`lorakernels.kernels`."""
    ct = compute_dtype(x.dtype)
    b = None if bias is None else bias.to(ct)
    base = F.conv2d(x.to(ct), weight.to(ct), b, conv.stride, conv.padding, conv.dilation)
    return add_conv_lora(x, base, lora, conv)


def add_conv_lora(x: Tensor, base: Tensor, lora: LoRAArgs, conv: ConvMeta) -> Tensor:
    """``base + LoRA terms`` rounded once to ``x.dtype``: the LoRA half of
    :func:`multi_lora_conv2d` on a base ``conv2d`` output computed elsewhere (``ops`` runs
    the base in ``x.dtype`` for backends without convolutions of their own)."""
    bank, batch = lora.bank, lora.batch
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    pieces = list(base.to(ct).split(torch.diff(batch.row_ptr).tolist()))
    for s, r0, r1, a, r, e in _entries(bank, batch):
        filt = bank.lora_a[a : a + r].to(ct).view(r, conv.c_in, conv.kh, conv.kw)
        t = F.conv2d(xc[r0:r1], filt, None, conv.stride, conv.padding, conv.dilation)
        up = bank.lora_bt[a : a + r].to(ct).T.reshape(-1, r, 1, 1)
        pieces[s] = pieces[s] + _coef(bank, batch, e, ct) * F.conv2d(t, up)
    out = torch.cat(pieces, dim=0) if pieces else base.to(ct)
    return out.to(x.dtype)


def unavailable_reason(device: torch.device) -> str | None:
    """The reference runs wherever torch does."""
    del device
    return None
