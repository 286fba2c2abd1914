"""The shrink/expand pair (SGMV style): adds the LoRA term onto an output computed elsewhere.

Semantics (plain PyTorch; argument table in :mod:`lorakernels.kernels`)::

    # lora_shrink -> t, fp32 [M, max_entries * max_rank]
    for s in range(S):
        rows = slice(row_ptr[s], row_ptr[s + 1])
        for j, e in enumerate(range(entry_ptr[s], entry_ptr[s + 1])):
            l = entry_slot[e]; a = slot_start[l]; r = slot_rank[l]
            t[rows, j * max_rank : j * max_rank + r] = x[rows].float() @ lora_a[a:a + r].float().T

    # lora_expand: y += ..., in place, y keeps its dtype
    for s, j, e, l, a, r as above:
        y[rows] += entry_weight[e] * slot_scale[l] * (t[rows, j*max_rank : j*max_rank + r]
                                                      @ lora_bt[a:a + r].float())

Columns of ``t`` past a slot's rank are neither written nor read. Shapes: ``x [M, K]``,
``lora_a [R, K]``, ``lora_bt [R, N]``, ``y [M, N]``, ``t [M, max_entries * max_rank]``;
all sizes and strides are runtime values, tile sizes are compile-time.

Numerics: fp32 accumulation in both kernels; ``t`` is fp32 in memory; the expand multiplies the
scaled fp32 ``t`` with two MMAs of the input dtype (hi/lo split, see
:func:`~.common._expand_block`) and adds onto ``y`` in fp32, then rounds once. ``y`` itself was
rounded by whoever computed it, so base + pair rounds twice (the fused kernel rounds once).
The shrink adds its fp32 results with atomics into a zeroed ``t``: with split-K the low bits
depend on the order the splits finish; with ``split_k == 1`` both kernels are deterministic.

Grids (host capacities only, CUDA-graph safe): shrink ``(cdiv(M, BLOCK_M) + S) *
cdiv(max_entries * max_rank, BLOCK_R) * split_k`` programs; expand ``(cdiv(M, BLOCK_M) + S) *
cdiv(N, BLOCK_N)``. Programs whose row tile or rank block holds nothing exit at once; the
expand leaves the rows of samples without LoRA untouched.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _dot, _expand_block, _rank_columns, _tile_rows


# Batch-dependent integers are not specialized (a value of 1 would otherwise compile a
# variant of its own, e.g. for a one-sample batch or split_k == 1).
@triton.jit(
    do_not_specialize=[
        "S",
        "max_entries",
        "max_rank",
        "num_slots",
        "bank_rows",
        "n_rank_blocks",
        "split_k",
        "k_blocks_per_split",
    ]
)
def _lora_shrink_kernel(
    x_ptr,
    lora_a_ptr,
    slot_start_ptr,
    slot_rank_ptr,
    row_ptr_ptr,
    entry_ptr_ptr,
    entry_slot_ptr,
    t_ptr,
    K,
    S,
    max_entries,
    max_rank,
    num_slots,
    bank_rows,
    n_rank_blocks,
    split_k,
    k_blocks_per_split,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_tm,
    stride_tc,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    # Split-K slices of one tile are adjacent; then rank blocks; row tiles vary slowest, so
    # the programs reading the same x rows run close together.
    pid_k = pid % split_k
    rest = pid // split_k
    block_r = rest % n_rank_blocks
    tile_m = rest // n_rank_blocks
    sample, row_begin, row_end = _tile_rows(tile_m, row_ptr_ptr, S, BLOCK_M, BLOCK_S)
    if sample >= S:
        return
    cols = block_r * BLOCK_R + tl.arange(0, BLOCK_R)
    bank_row, t_col, coef, packed = _rank_columns(
        cols,
        tl.load(entry_ptr_ptr + sample),
        tl.load(entry_ptr_ptr + sample + 1),
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
    if block_r * BLOCK_R >= packed:
        return

    offs_m = row_begin + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_r = cols < packed
    rows64 = offs_m.to(tl.int64)
    # k_begin is a multiple of BLOCK_K the compiler can see, so the x and A loads keep their
    # 16-byte alignment and the K loop is software-pipelined (cp.async needs >= 4-byte copies).
    k_begin = pid_k * k_blocks_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + k_blocks_per_split * BLOCK_K, K)
    x_ptrs = x_ptr + rows64[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    a_ptrs = lora_a_ptr + bank_row.to(tl.int64)[None, :] * stride_ar
    a_ptrs += (k_begin + offs_k)[:, None] * stride_ak
    t = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        t = _dot(x, a, t, INPUT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    # Always an fp32 atomic add into the zeroed t: with split_k == 1 each element has one
    # writer (deterministic, as cheap as a store on the GPU); one compiled variant serves all.
    t_ptrs = t_ptr + rows64[:, None] * stride_tm + t_col.to(tl.int64)[None, :] * stride_tc
    tl.atomic_add(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["S", "max_entries", "max_rank", "num_slots", "bank_rows"])
def _lora_expand_kernel(
    y_ptr,
    t_ptr,
    lora_bt_ptr,
    slot_start_ptr,
    slot_rank_ptr,
    slot_scale_ptr,
    row_ptr_ptr,
    entry_ptr_ptr,
    entry_slot_ptr,
    entry_weight_ptr,
    N,
    S,
    max_entries,
    max_rank,
    num_slots,
    bank_rows,
    stride_ym,
    stride_yn,
    stride_tm,
    stride_tc,
    stride_btr,
    stride_btn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_T: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    tile_m = pid // n_tiles_n
    tile_n = pid % n_tiles_n
    sample, row_begin, row_end = _tile_rows(tile_m, row_ptr_ptr, S, BLOCK_M, BLOCK_S)
    if sample >= S:
        return
    entry_begin = tl.load(entry_ptr_ptr + sample)
    entry_end = tl.load(entry_ptr_ptr + sample + 1)
    offs_r = tl.arange(0, BLOCK_R)
    bank_row, t_col, coef, packed = _rank_columns(
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
    )
    if packed == 0:
        return  # no LoRA for this sample: y stays as it is

    offs_m = row_begin + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    rows64 = offs_m.to(tl.int64)
    cols64 = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, packed, BLOCK_R):
        cols = r0 + offs_r
        bank_row, t_col, coef, _ = _rank_columns(
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
        mask_r = cols < packed
        t_ptrs = t_ptr + rows64[:, None] * stride_tm + t_col.to(tl.int64)[None, :] * stride_tc
        t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt_ptrs = lora_bt_ptr + bank_row.to(tl.int64)[:, None] * stride_btr
        bt_ptrs += cols64[None, :] * stride_btn
        acc = _expand_block(
            acc,
            t,
            coef,
            bt_ptrs,
            mask_r[:, None] & mask_n[None, :],
            INPUT_PRECISION,
            UPCAST,
            SPLIT_T,
        )

    y_ptrs = y_ptr + rows64[:, None] * stride_ym + cols64[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)
