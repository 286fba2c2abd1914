"""Fused kernel with a weight and a LoRA switch per sample: merged and unmerged groups in one
launch (issue 13, item 4).

Semantics (plain PyTorch; the rest of the argument table as :mod:`.fused`)::

    for s in range(S):
        rows = slice(row_ptr[s], row_ptr[s + 1])
        g = seg_weight[s]                        # -1: the base weight, else merged[g]
        w = weight if g < 0 else merged[g]       # merged[g] = W + sum w*scale*B@A, precomputed
        y[rows] = x[rows].float() @ w.float().T + bias
        if seg_lora[s]:                          # 0 for groups whose merged weight holds it
            y[rows] += the sample's LoRA terms exactly as in :mod:`.fused`
    return y.to(x.dtype)

Shapes: ``merged [G, N, K]`` in ``x.dtype`` with the same strides as ``weight``
(``stride_mg`` between weights), ``seg_weight`` and ``seg_lora`` ``int32 [S]``; ``G``, the
indices and the flags are runtime values, so a new merged group never recompiles, and the
grid is the fused kernel's. A planner (``lorakernels/plan.py``) decides per group of samples
whether to merge; this kernel only executes the decision.

Numerics: as :mod:`.fused` (fp32 accumulation, fp32 rank intermediate, one rounding). A
merged weight is rounded to ``x.dtype`` when it is stored, so merged rows carry that rounding
in addition (the planner's documented rule). Indices outside ``[-1, G)`` read the base
weight, like an unmerged group.

Reuses the fused kernel's device helpers; only the entry differs (the fused kernel itself is
unchanged, so its compiled variants and their AOT report stay valid).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _tile_rows
from .fused import _a_block, _expand_cols, _k_loop, _shrink_only_loop


@triton.jit(do_not_specialize=["S", "max_entries", "max_rank", "num_slots", "bank_rows", "G"])
def _fused_segmented_kernel(
    x_ptr,
    weight_ptr,
    merged_ptr,
    seg_weight_ptr,
    seg_lora_ptr,
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
    G,
    max_entries,
    max_rank,
    num_slots,
    bank_rows,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_mg,
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
    rows64 = offs_m.to(tl.int64)
    cols64 = offs_n.to(tl.int64)
    x_ptrs = x_ptr + rows64[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # The sample's weight: merged[g] for a merged group, else the base weight. Both start
    # 16-byte aligned and share strides, so the loads keep their vector width.
    g = tl.load(seg_weight_ptr + sample)
    use_merged = (g >= 0) & (g < G)
    w_base = tl.where(
        use_merged, merged_ptr + tl.where(use_merged, g, 0).to(tl.int64) * stride_mg, weight_ptr
    )
    w_ptrs = w_base + cols64[None, :] * stride_wn + offs_k[:, None] * stride_wk

    entry_begin = tl.load(entry_ptr_ptr + sample)
    # A merged group's LoRA is inside its weight: an empty entry range skips the LoRA work.
    entry_end = tl.where(
        tl.load(seg_lora_ptr + sample) != 0, tl.load(entry_ptr_ptr + sample + 1), entry_begin
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
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
