"""Implementations of the multi-LoRA ops, one module per backend.

Every backend module exposes the same kernel-level functions and never imports another
backend module (``ops.py`` is the only place that chooses between them):

.. code-block:: python

    def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs) -> Tensor
    def unavailable_reason(device: torch.device) -> str | None

and, where the backend has one, the convolution, base ``conv2d`` included (``ops`` runs a
backend without one as its linear op over pixel rows for 1x1 convolutions, and as the base
``conv2d`` plus the reference's LoRA term for k x k ones):

.. code-block:: python

    def multi_lora_conv2d(
        x: Tensor, weight: Tensor, bias: Tensor | None, lora: LoRAArgs, conv: ConvMeta
    ) -> Tensor

``lora`` (:class:`LoRAArgs`, the one kernel-metadata object, as in vLLM) holds two bundles and
the bounds: ``lora.bank``, the layer's adapter storage (:class:`BankTensors`, from
:class:`~lorakernels.bank.LoRABank`); ``lora.batch``, the forward pass's adapter map
(:class:`BatchTensors`, from :meth:`~lorakernels.batch.LoRABatch.tensors`); ``lora.meta``, the
host-side bounds (:class:`LaunchMeta`). They are named tuples, so a launcher that needs flat
tensors unpacks them (``*lora.bank``) and ``bank._replace(lora_a=..., lora_bt=...)`` swaps
fields. All are already validated by ``lorakernels.ops`` (same device everywhere; dtypes as
below).

=================== ========================== ================================================
``x``               ``[M, K]`` float dtype      input rows; ``x.stride(1) == 1``
``weight``          ``[N, K]`` same dtype        base weight (``nn.Linear`` layout)
``bias``            ``[N]`` same dtype or None
``bank.lora_a``     ``[R, K]`` same dtype        bank rank rows: rows ``start .. start+rank`` of
                                                 a slot hold that adapter's ``A`` (down)
``bank.lora_bt``    ``[R, N]`` same dtype        the same rank rows of ``B.T`` (up, transposed):
                                                 ``lora_bt[start + j, n] == B[n, j]``
``bank.slot_start`` ``int32 [L]``                first bank row of each slot
``bank.slot_rank``  ``int32 [L]``                rank of each slot in this layer (0 = absent)
``bank.slot_scale`` ``float32 [L]``              ``alpha / r`` of each slot in this layer
``batch.row_ptr``   ``int32 [S+1]``              rows of sample ``s``: ``row_ptr[s]:row_ptr[s+1]``
``batch.entry_ptr`` ``int32 [S+1]``              entries of sample ``s``: ``entry_ptr[s]:…[s+1]``
``batch.entry_slot`` ``int32 [E_cap]``           slot of each mixture entry (``E_cap >= E``)
``batch.entry_weight`` ``float32 [E_cap]``       strength of each mixture entry
``meta``            :class:`LaunchMeta`          host-side upper bounds (never read from device)
=================== ========================== ================================================

Semantics (plain PyTorch, the contract every backend meets)::

    y = x.float() @ weight.float().T + bias
    for s in range(S):
        rows = slice(row_ptr[s], row_ptr[s + 1])
        for e in range(entry_ptr[s], entry_ptr[s + 1]):
            l = entry_slot[e]; a = slot_start[l]; r = slot_rank[l]
            t = x[rows].float() @ lora_a[a:a + r].float().T        # fp32 [rows, r], never rounded
            y[rows] += entry_weight[e] * slot_scale[l] * (t @ lora_bt[a:a + r].float())
    return y.to(x.dtype)

The k x k convolution is the same loop with ``x [N_img, C_in, H, W]`` split into ``S`` equal
groups of images (``row_ptr`` counts images) and the two products replaced by convolutions::

    t = conv2d(x[rows].float(), lora_a[a:a + r].view(r, C_in, kh, kw), stride, padding, dilation)
    y[rows] += entry_weight[e] * slot_scale[l] * conv2d(t, lora_bt[a:a + r].T.view(N, r, 1, 1))

with ``y = conv2d(x, weight, bias, stride, padding, dilation).float()`` (the layer's own
``conv2d``, ``weight [C_out, C_in, kh, kw]``) at the start.

Numerics: accumulate in fp32, the rank intermediate stays fp32, one rounding to ``x.dtype``
at the end (float64 inputs are computed in float64).

The split pair ``lora_shrink(x, lora)`` / ``lora_expand(y, t, lora)`` (GPU backends) shares
one intermediate layout: ``t`` is fp32 ``[M, meta.max_entries * meta.max_rank]``; the ``j``-th
entry of a row's sample occupies columns ``j * max_rank : j * max_rank + rank``; columns past
the slot's rank are never read. The strength and the scale are applied by ``lora_expand``.

``unavailable_reason`` returns ``None`` when the backend can run on tensors of that device,
else a sentence saying why not (an explicit request for that backend raises with it; only
automatic selection moves on to another backend). ``ops`` calls it once per distinct
(device, dtype, choice) and caches the answer, so launchers need not check availability again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["BankTensors", "BatchTensors", "ConvMeta", "LaunchMeta", "LoRAArgs", "compute_dtype"]


class BankTensors(NamedTuple):
    """One layer's adapter storage as the kernels read it (see the module's table)."""

    lora_a: Tensor
    lora_bt: Tensor
    slot_start: Tensor
    slot_rank: Tensor
    slot_scale: Tensor


class BatchTensors(NamedTuple):
    """One forward pass's adapter map for a layer input of a given row count."""

    row_ptr: Tensor
    entry_ptr: Tensor
    entry_slot: Tensor
    entry_weight: Tensor


class ConvMeta(NamedTuple):
    """Host-side geometry of a k x k convolution: ``A`` rows are ``[C_in, kh, kw]`` filters.

    ``padding`` is ``(ph, pw)`` or ``"same"``/``"valid"``, as ``F.conv2d`` takes it (padding
    modes other than zeros are applied to ``x`` by the caller, which then passes ``(0, 0)``).
    """

    c_in: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, no padding: a GEMM per image over its pixels (dilation is moot)."""
        return (
            self.kh == self.kw == 1
            and self.stride == (1, 1)
            and self.padding in ((0, 0), "valid", "same")
        )


@dataclass(frozen=True)
class LaunchMeta:
    """Host-side upper bounds that size grids and scratch buffers.

    Backends size every grid and buffer by these three bounds and never read them from the
    device. Which values ``ops`` passes depends on the mode:

    * eager calls get the *real* maxima of this call: the batch's largest entry count per
      sample (:attr:`~lorakernels.batch.LoRABatch.real_max_entries`) and the bank's largest
      resident rank, so dispatch costs reflect the work actually there (a capacity of 4
      entries made Triton price one rank-32 adapter as a summed rank of 128);
    * under ``torch.compile``, during CUDA-graph capture, or for a frozen batch
      (:meth:`~lorakernels.batch.LoRABatch.freeze`) they are *capacities*
      (:attr:`~lorakernels.batch.LoRABatch.max_entries`), so a graph captured with one batch
      replays with another that fits them.

    Attributes:
        max_rows: upper bound on the rows of any one sample.
        max_entries: upper bound on the mixture entries of any one sample.
        max_rank: upper bound on ``slot_rank`` in this layer (0 when no adapter is resident).
    """

    max_rows: int
    max_entries: int
    max_rank: int


class LoRAArgs(NamedTuple):
    """Everything a kernel needs besides the layer's own tensors: one object per call."""

    bank: BankTensors
    batch: BatchTensors
    meta: LaunchMeta


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 compute in fp32; fp64 stays fp64 (so the oracle can run in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
