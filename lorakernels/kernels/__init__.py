"""Implementations of the multi-LoRA linear op, one module per backend.

Every backend module exposes the same kernel-level function and never imports another
backend module (``ops.py`` is the only place that chooses between them):

.. code-block:: python

    def multi_lora_linear(x, weight, bias, lora_a, lora_bt, slot_start, slot_rank, slot_scale,
                          row_ptr, entry_ptr, entry_slot, entry_weight, meta) -> Tensor

Arguments (already validated by ``lorakernels.ops``; same device everywhere):

=============== ========================== ====================================================
``x``           ``[M, K]`` float dtype      input rows; ``x.stride(1) == 1``
``weight``      ``[N, K]`` same dtype        base weight (``nn.Linear`` layout)
``bias``        ``[N]`` same dtype or None
``lora_a``      ``[R, K]`` same dtype        bank rank rows: rows ``start .. start+rank`` of a
                                             slot hold that adapter's ``A`` (down)
``lora_bt``     ``[R, N]`` same dtype        the same rank rows of ``B.T`` (up, transposed):
                                             ``lora_bt[start + j, n] == B[n, j]``
``slot_start``  ``int32 [L]``                first bank row of each slot
``slot_rank``   ``int32 [L]``                rank of each slot in this layer (0 = absent)
``slot_scale``  ``float32 [L]``              ``alpha / r`` of each slot in this layer
``row_ptr``     ``int32 [S+1]``              rows of sample ``s`` are ``row_ptr[s]:row_ptr[s+1]``
``entry_ptr``   ``int32 [S+1]``              entries of sample ``s`` are ``entry_ptr[s]:…[s+1]``
``entry_slot``  ``int32 [E_cap]``            slot of each mixture entry (``E_cap >= E``)
``entry_weight`` ``float32 [E_cap]``         strength of each mixture entry
``meta``        :class:`LaunchMeta`          host-side upper bounds (never read from device)
=============== ========================== ====================================================

Semantics (plain PyTorch, the contract every backend meets)::

    y = x.float() @ weight.float().T + bias
    for s in range(S):
        rows = slice(row_ptr[s], row_ptr[s + 1])
        for e in range(entry_ptr[s], entry_ptr[s + 1]):
            l = entry_slot[e]; a = slot_start[l]; r = slot_rank[l]
            t = x[rows].float() @ lora_a[a:a + r].float().T        # fp32 [rows, r], never rounded
            y[rows] += entry_weight[e] * slot_scale[l] * (t @ lora_bt[a:a + r].float())
    return y.to(x.dtype)

Numerics: accumulate in fp32, the rank intermediate stays fp32, one rounding to ``x.dtype``
at the end (float64 inputs are computed in float64).

The split pair ``lora_shrink``/``lora_expand`` (GPU backends) shares one intermediate layout:
``t`` is fp32 ``[M, meta.max_entries * meta.max_rank]``; the ``j``-th entry of a row's sample
occupies columns ``j * max_rank : j * max_rank + rank``; columns past the slot's rank are
never read. The strength and the scale are applied by ``lora_expand``.

Each backend module also exposes ``unavailable_reason(device: torch.device) -> str | None``:
``None`` when it can run on tensors of that device, else a sentence saying why not (an explicit
request for that backend raises with it; only automatic selection moves on to another backend).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchMeta:
    """Host-side upper bounds that size grids and scratch buffers.

    They are capacities, not exact values, so that a CUDA graph captured with one batch can be
    replayed with another that fits the same capacities.

    Attributes:
        max_rows: upper bound on the rows of any one sample.
        max_entries: upper bound on the mixture entries of any one sample.
        max_rank: upper bound on ``slot_rank`` in this layer (0 when no adapter is resident).
    """

    max_rows: int
    max_entries: int
    max_rank: int
