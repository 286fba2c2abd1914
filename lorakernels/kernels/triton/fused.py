"""Fused one-pass multi-LoRA linear: base GEMM, LoRA shrink, LoRA expand and bias in one launch.

Semantics (plain PyTorch; argument table in :mod:`lorakernels.kernels`)::

    y = x.float() @ weight.float().T + (bias.float() if bias is not None else 0)
    for s in range(S):
        rows = slice(row_ptr[s], row_ptr[s + 1])
        for e in range(entry_ptr[s], entry_ptr[s + 1]):
            l = entry_slot[e]; a = slot_start[l]; r = slot_rank[l]
            t = x[rows].float() @ lora_a[a:a + r].float().T          # fp32, never rounded
            y[rows] += entry_weight[e] * slot_scale[l] * (t @ lora_bt[a:a + r].float())
    return y.to(x.dtype)

Shapes: ``x [M, K]``, ``weight [N, K]``, ``bias [N]``, ``lora_a [R, K]``, ``lora_bt [R, N]``,
``y [M, N]``; ``M, N, K, S`` and all strides are runtime values, only tile sizes are
compile-time, so new adapters, strengths, ranks or batch layouts never recompile.

How: program ``pid`` owns the output tile ``(row tile, N tile)``; a row tile lies inside one
sample (:func:`~.common._tile_rows`). The sample's mixture is laid out as a packed rank space
(:func:`~.common._rank_columns`). While the K loop multiplies ``x`` by ``W`` it multiplies the
*same* ``x`` tile by the gathered ``A`` rows of the first ``BLOCK_R`` packed columns, so the
LoRA reads no extra ``x``; the epilogue applies ``t * coef`` to the gathered ``B`` rows, adds
the bias, and rounds once. With ``MULTI_BLOCK`` (chosen by the launcher when the summed-rank
capacity ``max_entries * max_rank`` exceeds ``BLOCK_R``) further rank blocks each re-walk K
for their shrink after the main loop; without it the launcher guarantees one block suffices
(a summed rank past the capacity is clamped, see :mod:`.common`). Samples whose mixture is
empty (or whose adapters are absent from this layer) run a plain GEMM loop.

Numerics: fp32 accumulation; the rank intermediate ``t`` stays fp32 (split into two halves of
the input dtype for the tensor-core expand, see :func:`~.common._expand_block`); one rounding
to ``x.dtype``. fp32 inputs use exact fp32 FMA (``input_precision="ieee"``), not TF32.

Launch: the grid is ``(cdiv(M, BLOCK_M) + S) * cdiv(N, BLOCK_N)`` programs, from host shapes
only; no device value is read on the host, so the launch can be captured in a CUDA graph and
replayed with another batch of the same capacities. Registers, spills and shared memory of
every config: ``python tests/test_triton_aot.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _dot, _expand_block, _rank_columns, _tile_rows


@triton.jit
def _k_loop(
    x_ptrs,
    w_ptrs,
    a_ptrs,
    mask_m,
    mask_n,
    mask_r,
    K,
    stride_xk,
    stride_wk,
    stride_ak,
    acc,
    t,
    WITH_LORA: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Walk K: ``acc += x @ W.T`` and, with ``WITH_LORA``, ``t += x @ A_block.T``."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(x, w, acc, INPUT_PRECISION, UPCAST)
        if WITH_LORA:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            t = _dot(x, a, t, INPUT_PRECISION, UPCAST)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, t


# Batch-dependent integers are not specialized (a value of 1 would otherwise compile a
# variant of its own, e.g. for a one-sample batch).
@triton.jit(do_not_specialize=["S", "max_entries", "max_rank", "num_slots", "bank_rows"])
def _fused_multi_lora_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    lora_a_ptr,
    lora_bt_ptr,
    slot_start_ptr,
    slot_rank_ptr,
    slot_scale_ptr,
    row_ptr_ptr,
    entry_ptr_ptr,
    entry_slot_ptr,
    entry_weight_ptr,
    y_ptr,
    N,
    K,
    S,
    max_entries,
    max_rank,
    num_slots,
    bank_rows,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_btr,
    stride_btn,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    MULTI_BLOCK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_T: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    # N tiles of one row tile are adjacent in launch order: they share the x tile and the
    # gathered A rows in L2 (W and the bank rows are small enough to stay there anyway).
    tile_m = pid // n_tiles_n
    tile_n = pid % n_tiles_n
    sample, row_begin, row_end = _tile_rows(tile_m, row_ptr_ptr, S, BLOCK_M, BLOCK_S)
    if sample >= S:
        return

    offs_m = row_begin + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    # int64: row * stride passes 2^31 for large M * K (e.g. 2^17 rows of 2^14 features).
    rows64 = offs_m.to(tl.int64)
    cols64 = offs_n.to(tl.int64)
    x_ptrs = x_ptr + rows64[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = weight_ptr + cols64[None, :] * stride_wn + offs_k[:, None] * stride_wk

    entry_begin = tl.load(entry_ptr_ptr + sample)
    entry_end = tl.load(entry_ptr_ptr + sample + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    # The rank-column map is recomputed where it is used (a loop over the sample's few entries
    # with scalar loads) instead of being kept alive across the K loop: registers, not loads,
    # limit these tiles (see the AOT table).
    a_ptrs, mask_r, packed = _a_block(
        offs_r,
        entry_begin,
        entry_end,
        entry_slot_ptr,
        slot_start_ptr,
        slot_rank_ptr,
        max_entries,
        max_rank,
        num_slots,
        bank_rows,
        lora_a_ptr,
        stride_ar,
        stride_ak,
        BLOCK_K,
    )
    if packed > 0:
        acc, t = _k_loop(
            x_ptrs,
            w_ptrs,
            a_ptrs,
            mask_m,
            mask_n,
            mask_r,
            K,
            stride_xk,
            stride_wk,
            stride_ak,
            acc,
            t,
            True,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST,
        )
        acc = _expand_cols(
            acc,
            t,
            offs_r,
            entry_begin,
            entry_end,
            entry_slot_ptr,
            entry_weight_ptr,
            slot_start_ptr,
            slot_rank_ptr,
            slot_scale_ptr,
            max_entries,
            max_rank,
            num_slots,
            bank_rows,
            lora_bt_ptr,
            stride_btr,
            stride_btn,
            offs_n,
            mask_n,
            INPUT_PRECISION,
            UPCAST,
            SPLIT_T,
        )
        # Further rank blocks (summed rank > BLOCK_R): each re-walks K for its shrink only.
        # Compiled only when the capacity needs it (MULTI_BLOCK): the extra loop costs
        # registers even when it never runs (sm_80 spills without the split).
        if MULTI_BLOCK:
            for r0 in range(BLOCK_R, packed, BLOCK_R):
                a_ptrs, mask_r, _ = _a_block(
                    r0 + offs_r,
                    entry_begin,
                    entry_end,
                    entry_slot_ptr,
                    slot_start_ptr,
                    slot_rank_ptr,
                    max_entries,
                    max_rank,
                    num_slots,
                    bank_rows,
                    lora_a_ptr,
                    stride_ar,
                    stride_ak,
                    BLOCK_K,
                )
                t = _shrink_only_loop(
                    x_ptrs,
                    a_ptrs,
                    mask_m,
                    mask_r,
                    K,
                    stride_xk,
                    stride_ak,
                    tl.zeros((BLOCK_M, BLOCK_R), tl.float32),
                    BLOCK_K,
                    INPUT_PRECISION,
                    UPCAST,
                )
                acc = _expand_cols(
                    acc,
                    t,
                    r0 + offs_r,
                    entry_begin,
                    entry_end,
                    entry_slot_ptr,
                    entry_weight_ptr,
                    slot_start_ptr,
                    slot_rank_ptr,
                    slot_scale_ptr,
                    max_entries,
                    max_rank,
                    num_slots,
                    bank_rows,
                    lora_bt_ptr,
                    stride_btr,
                    stride_btn,
                    offs_n,
                    mask_n,
                    INPUT_PRECISION,
                    UPCAST,
                    SPLIT_T,
                )
    else:
        acc, t = _k_loop(
            x_ptrs,
            w_ptrs,
            x_ptrs,
            mask_m,
            mask_n,
            mask_n,
            K,
            stride_xk,
            stride_wk,
            stride_xk,
            acc,
            t,
            False,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST,
        )

    if bias_ptr is not None:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows64[:, None] * stride_ym + cols64[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _shrink_only_loop(
    x_ptrs,
    a_ptrs,
    mask_m,
    mask_r,
    K,
    stride_xk,
    stride_ak,
    t,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``t += x @ A_block.T`` over all of K (rank blocks after the first)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        t = _dot(x, a, t, INPUT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return t


@triton.jit
def _a_block(
    cols,
    entry_begin,
    entry_end,
    entry_slot_ptr,
    slot_start_ptr,
    slot_rank_ptr,
    max_entries,
    max_rank,
    num_slots,
    bank_rows,
    lora_a_ptr,
    stride_ar,
    stride_ak,
    BLOCK_K: tl.constexpr,
):
    """Pointers ``[BLOCK_K, BLOCK_R]`` to the gathered A rows of packed columns ``cols``."""
    bank_row, t_col, coef, packed = _rank_columns(
        cols,
        entry_begin,
        entry_end,
        entry_slot_ptr,
        None,
        slot_start_ptr,
        slot_rank_ptr,
        None,
        max_entries,
        max_rank,
        num_slots,
        bank_rows,
    )
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = lora_a_ptr + bank_row.to(tl.int64)[None, :] * stride_ar
    a_ptrs += offs_k[:, None] * stride_ak
    return a_ptrs, cols < packed, packed


@triton.jit
def _expand_cols(
    acc,
    t,
    cols,
    entry_begin,
    entry_end,
    entry_slot_ptr,
    entry_weight_ptr,
    slot_start_ptr,
    slot_rank_ptr,
    slot_scale_ptr,
    max_entries,
    max_rank,
    num_slots,
    bank_rows,
    lora_bt_ptr,
    stride_btr,
    stride_btn,
    offs_n,
    mask_n,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_T: tl.constexpr,
):
    """``acc += (t * coef) @ Bt[bank rows of cols]`` for one block of packed columns."""
    bank_row, t_col, coef, packed = _rank_columns(
        cols,
        entry_begin,
        entry_end,
        entry_slot_ptr,
        entry_weight_ptr,
        slot_start_ptr,
        slot_rank_ptr,
        slot_scale_ptr,
        max_entries,
        max_rank,
        num_slots,
        bank_rows,
    )
    bt_ptrs = lora_bt_ptr + bank_row.to(tl.int64)[:, None] * stride_btr
    bt_ptrs += offs_n.to(tl.int64)[None, :] * stride_btn
    mask = (cols < packed)[:, None] & mask_n[None, :]
    return _expand_block(acc, t, coef, bt_ptrs, mask, INPUT_PRECISION, UPCAST, SPLIT_T)
