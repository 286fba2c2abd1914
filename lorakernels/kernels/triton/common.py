"""Triton helpers shared by the fused kernel and the shrink/expand pair.

* :func:`_tile_rows` maps a row-tile id to ``(sample, first row, end row)`` on the device from
  ``row_ptr``, so grids can be sized from host capacities (``cdiv(M, BLOCK_M) + S`` row tiles
  always suffice: ``sum_s cdiv(rows_s, BM) <= cdiv(M, BM) + S - 1``) and a tile never straddles
  two samples. Tiles past the last one report ``sample == S`` and their program exits.
* :func:`_rank_columns` lays one sample's mixture out as a packed rank space: entry ``j`` of
  the sample owns packed columns ``off_j .. off_j + rank_j`` (``off_j`` = sum of the earlier
  ranks), so heterogeneous ranks cost compute only up to the rank-block granularity. For a
  block of packed columns it returns the bank row feeding each column, the ``t`` column of the
  shrink/expand intermediate (``j * max_rank + i``, the contract's layout), and optionally the
  coefficient ``entry_weight[e] * slot_scale[slot]``.
* :func:`_dot` is ``tl.dot`` with the precision the launcher picked; under ``TRITON_INTERPRET``
  the launcher asks it to up-cast bf16 operands to fp32 first, because Triton 3.9's interpreter
  multiplies the raw 16-bit patterns of bf16 tensors. bf16 x bf16 products are exact in fp32,
  so the up-cast computes the same sums as a bf16 MMA with fp32 accumulation; compiled GPU
  code never takes that branch.

Capacities and bounds, identical to the csrc kernels (``resolve_entry`` in
``csrc/cuda/sgmv_common.cuh``): entries past ``max_entries`` of a sample are ignored, and an
entry is skipped whole (rank 0, nothing read) when its slot is outside ``[0, num_slots)``, its
rank exceeds ``max_rank``, or its rows ``start .. start + rank`` leave the bank's
``bank_rows``. ``LaunchMeta`` promises none of this happens; the launcher and the bank raise
where a host-side check can see it, and skipping (never truncating, never reading past an
array) keeps a broken promise -- e.g. a CUDA graph replayed after a capacity grew, or a
``torch.compile`` graph where validation is skipped -- from reading or writing out of bounds,
with the same result on both GPU backends.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_rows(tile, row_ptr_ptr, S, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """``(sample, row_begin, row_end)`` of row tile ``tile``; ``sample == S`` past the end."""
    n_before = tl.zeros((), tl.int32)  # samples whose tiles all come before ``tile``
    tiles_before = tl.zeros((), tl.int32)  # how many tiles those samples own
    running = tl.zeros((), tl.int32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        live = s < S
        lo = tl.load(row_ptr_ptr + s, mask=live, other=0)
        hi = tl.load(row_ptr_ptr + s + 1, mask=live, other=0)
        n_tiles = tl.where(live, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
        inclusive = running + tl.cumsum(n_tiles, 0)
        before = live & (inclusive <= tile)
        n_before += tl.sum(before.to(tl.int32), 0)
        tiles_before = tl.maximum(tiles_before, tl.max(tl.where(before, inclusive, 0), 0))
        running += tl.sum(n_tiles, 0)
    sample = n_before
    # Clamped index keeps the loads in bounds for dead tiles; callers exit when sample == S.
    safe = tl.minimum(sample, S - 1)
    row_begin = tl.load(row_ptr_ptr + safe) + (tile - tiles_before) * BLOCK_M
    row_end = tl.load(row_ptr_ptr + safe + 1)
    return sample, row_begin, row_end


@triton.jit
def _rank_columns(
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
):
    """Map packed rank columns ``cols`` of one sample to bank rows, ``t`` columns, coefficients.

    Returns ``(bank_row, t_col, coef, packed)``: ``packed`` is the sample's summed rank;
    columns ``>= packed`` are padding (bank row 0, coefficient 0) and must be masked by the
    caller. ``entry_weight_ptr``/``slot_scale_ptr`` may be ``None`` (the shrink needs no
    coefficients); ``coef`` is then all zeros. Invalid entries count as rank 0 (module doc).
    """
    bank_row = tl.zeros(cols.shape, tl.int32)
    t_col = tl.zeros(cols.shape, tl.int32)
    coef = tl.zeros(cols.shape, tl.float32)
    packed = tl.zeros((), tl.int32)
    entry_end = tl.minimum(entry_end, entry_begin + max_entries)
    for e in range(entry_begin, entry_end):
        slot = tl.load(entry_slot_ptr + e)
        in_range = (slot >= 0) & (slot < num_slots)
        slot = tl.where(in_range, slot, 0)  # a safe index; the entry is dropped below
        rank = tl.load(slot_rank_ptr + slot)
        start = tl.load(slot_start_ptr + slot)
        valid = in_range & (rank > 0) & (rank <= max_rank) & (start >= 0)
        valid = valid & (start <= bank_rows - rank)
        rank = tl.where(valid, rank, 0)
        inside = (cols >= packed) & (cols < packed + rank)
        within = cols - packed
        bank_row = tl.where(inside, start + within, bank_row)
        t_col = tl.where(inside, (e - entry_begin) * max_rank + within, t_col)
        if entry_weight_ptr is not None:
            c = tl.load(entry_weight_ptr + e) * tl.load(slot_scale_ptr + slot)
            coef = tl.where(inside, c, coef)
        packed += rank
    return bank_row, t_col, coef, packed


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32; see the module docstring for ``UPCAST``."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _expand_block(
    acc,
    t,
    coef,
    bt_ptrs,
    bt_mask,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_T: tl.constexpr,
):
    """``acc += (t * coef) @ Bt_block`` with ``t`` fp32 ``[BM, BR]`` and ``Bt`` ``[BR, BN]``.

    ``SPLIT_T`` (fp16/bf16): the scaled fp32 intermediate is split as ``hi + lo`` with both
    halves in the input dtype and multiplied by two tensor-core MMAs, so the intermediate keeps
    ~2x the input dtype's mantissa (16 bits for bf16, 22 for fp16) instead of being rounded to
    it; the residual error is far below the single rounding of the output.
    """
    bt = tl.load(bt_ptrs, mask=bt_mask, other=0.0)
    scaled = t * coef[None, :]
    if SPLIT_T:
        hi = scaled.to(bt.dtype)
        lo = (scaled - hi.to(tl.float32)).to(bt.dtype)
        acc = _dot(hi, bt, acc, INPUT_PRECISION, UPCAST)
        acc = _dot(lo, bt, acc, INPUT_PRECISION, UPCAST)
    else:
        acc = _dot(scaled, bt.to(tl.float32), acc, INPUT_PRECISION, UPCAST)
    return acc
