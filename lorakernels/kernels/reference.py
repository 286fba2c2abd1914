"""Reference backend: readable, differentiable PyTorch; the oracle every other backend meets.

Semantics: exactly the loop in :mod:`lorakernels.kernels` (one sample and one mixture entry at
a time). Computes in float32, or float64 when ``x`` is float64, and rounds once to ``x.dtype``.
It reads the batch's device tensors on the host (``.tolist()``), so it is neither fast nor
CUDA-graph safe; it exists to be obviously right.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import LaunchMeta


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 compute in fp32; fp64 stays fp64 (so the oracle can run in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    del meta  # the reference needs no launch bounds
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    y = xc @ weight.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    rows = row_ptr.tolist()
    ptr = entry_ptr.tolist()
    starts, ranks = slot_start.tolist(), slot_rank.tolist()
    pieces = []
    for s in range(len(rows) - 1):
        r0, r1 = rows[s], rows[s + 1]
        ys = y[r0:r1]
        for e in range(ptr[s], ptr[s + 1]):
            slot = int(entry_slot[e])
            a, r = starts[slot], ranks[slot]
            if r == 0:
                continue  # the adapter does not touch this layer
            t = xc[r0:r1] @ lora_a[a : a + r].to(ct).T  # rank intermediate, never rounded
            coef = entry_weight[e].to(ct) * slot_scale[slot].to(ct)
            ys = ys + coef * (t @ lora_bt[a : a + r].to(ct))
        pieces.append(ys)
    out = torch.cat(pieces, dim=0) if pieces else y
    return out.to(x.dtype)


def unavailable_reason(device: torch.device) -> str | None:
    """The reference runs wherever torch does."""
    del device
    return None
