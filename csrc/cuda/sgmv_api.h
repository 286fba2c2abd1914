// Host side of the C ABI, shared by the GPU library (sgmv_*.cu) and the host emulation
// (csrc/emulate): argument checks, the launch grid and the kernel parameter blocks. Each
// build supplies `run`, a functor whose templated call operator launches (GPU) or emulates
// (host) one grid: run(const ShrinkParams<T>&, Grid3) / run(const ExpandParams<T, Tin>&, Grid3).
#pragma once

#include "lorakernels.h"
#include "sgmv_expand.cuh"
#include "sgmv_shrink.cuh"

namespace lk {

// Formats the thread's last-error message (printf style) and returns `status`.
lk_status fail(lk_status status, const char* fmt, ...);
// Resets the thread's last-error message.
void clear_error();

// CUDA limits on grid.x and on grid.y / grid.z.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

template <class T, class Run>
lk_status shrink_typed(const Run& run, const void* x, int64_t ldx, const void* lora_a,
                       int64_t lda, float* t, int64_t ldt, const int32_t* slot_start,
                       const int32_t* slot_rank, const int32_t* row_ptr,
                       const int32_t* entry_ptr, const int32_t* entry_slot, int64_t num_samples,
                       int64_t num_slots, int64_t bank_rows, int64_t K, int64_t max_rows,
                       int64_t max_entries, int64_t max_rank) {
  using Cfg = ShrinkCfg<T>;
  const Grid3 g = shrink_grid<Cfg>(num_samples, max_rows, max_entries, max_rank);
  if (g.x > kMaxGridX || g.y > kMaxGridYZ || g.z > kMaxGridYZ) {
    return fail(LK_INVALID_ARGUMENT,
                "lk_sgmv_shrink: grid (%lld, %lld, %lld) exceeds CUDA limits; lower max_rows, "
                "max_entries or max_rank",
                (long long)g.x, (long long)g.y, (long long)g.z);
  }
  ShrinkParams<T> p;
  p.x = static_cast<const T*>(x);
  p.ldx = ldx;
  p.lora_a = static_cast<const T*>(lora_a);
  p.lda = lda;
  p.t = t;
  p.ldt = ldt;
  p.slot_start = slot_start;
  p.slot_rank = slot_rank;
  p.row_ptr = row_ptr;
  p.entry_ptr = entry_ptr;
  p.entry_slot = entry_slot;
  p.num_samples = num_samples;
  p.num_slots = num_slots;
  p.bank_rows = bank_rows;
  p.K = K;
  p.m_tiles = cdiv(max_rows, Cfg::BM);
  p.max_entries = max_entries;
  p.max_rank = max_rank;
  return run(p, g);
}

template <class Run>
lk_status shrink_api(const Run& run, lk_dtype dtype, const void* x, int64_t ldx,
                     const void* lora_a, int64_t lda, float* t, int64_t ldt,
                     const int32_t* slot_start, const int32_t* slot_rank, const int32_t* row_ptr,
                     const int32_t* entry_ptr, const int32_t* entry_slot, int64_t num_samples,
                     int64_t num_slots, int64_t bank_rows, int64_t K, int64_t max_rows,
                     int64_t max_entries, int64_t max_rank) {
  clear_error();
  if (num_samples < 0 || num_slots < 0 || bank_rows < 0 || K < 0 || max_rows < 0 ||
      max_entries < 0 || max_rank < 0) {
    return fail(LK_INVALID_ARGUMENT, "lk_sgmv_shrink: sizes and capacities must be >= 0");
  }
  if (ldx < K || lda < K || ldt < max_entries * max_rank) {
    return fail(LK_INVALID_ARGUMENT,
                "lk_sgmv_shrink: leading strides too small (ldx=%lld, lda=%lld need >= K=%lld; "
                "ldt=%lld needs >= max_entries*max_rank=%lld)",
                (long long)ldx, (long long)lda, (long long)K, (long long)ldt,
                (long long)(max_entries * max_rank));
  }
  if (num_samples == 0 || max_rows == 0 || max_entries == 0 || max_rank == 0) return LK_OK;
  if (!x || !lora_a || !t || !slot_start || !slot_rank || !row_ptr || !entry_ptr || !entry_slot) {
    return fail(LK_INVALID_ARGUMENT, "lk_sgmv_shrink: a required pointer is NULL");
  }
#define LK_SHRINK_ARGS                                                                       \
  run, x, ldx, lora_a, lda, t, ldt, slot_start, slot_rank, row_ptr, entry_ptr, entry_slot, \
      num_samples, num_slots, bank_rows, K, max_rows, max_entries, max_rank
  switch (dtype) {
    case LK_FLOAT32:
      return shrink_typed<float>(LK_SHRINK_ARGS);
    case LK_FLOAT16:
      return shrink_typed<f16>(LK_SHRINK_ARGS);
    case LK_BFLOAT16:
      return shrink_typed<bf16>(LK_SHRINK_ARGS);
  }
#undef LK_SHRINK_ARGS
  return fail(LK_INVALID_ARGUMENT, "lk_sgmv_shrink: unknown dtype %d", (int)dtype);
}

struct ExpandArgs {
  const void* y_in;
  int64_t ldyi;
  void* y_out;
  int64_t ldyo;
  const float* t;
  int64_t ldt;
  const void* lora_bt;
  int64_t ldb;
  const int32_t* slot_start;
  const int32_t* slot_rank;
  const float* slot_scale;
  const int32_t* row_ptr;
  const int32_t* entry_ptr;
  const int32_t* entry_slot;
  const float* entry_weight;
  int64_t num_samples, num_slots, bank_rows, N, max_rows, max_entries, max_rank;
};

template <class T, class Tin, class Run>
lk_status expand_typed(const Run& run, const ExpandArgs& a) {
  using Cfg = ExpandCfg<T>;
  const Grid3 g = expand_grid<Cfg>(a.num_samples, a.max_rows, a.N);
  if (g.x > kMaxGridX || g.y > kMaxGridYZ) {
    return fail(LK_INVALID_ARGUMENT,
                "lk_sgmv_expand: grid (%lld, %lld) exceeds CUDA limits; lower max_rows or N",
                (long long)g.x, (long long)g.y);
  }
  ExpandParams<T, Tin> p;
  p.y_in = static_cast<const Tin*>(a.y_in);
  p.ldyi = a.ldyi;
  p.y_out = static_cast<T*>(a.y_out);
  p.ldyo = a.ldyo;
  p.t = a.t;
  p.ldt = a.ldt;
  p.lora_bt = static_cast<const T*>(a.lora_bt);
  p.ldb = a.ldb;
  p.slot_start = a.slot_start;
  p.slot_rank = a.slot_rank;
  p.slot_scale = a.slot_scale;
  p.row_ptr = a.row_ptr;
  p.entry_ptr = a.entry_ptr;
  p.entry_slot = a.entry_slot;
  p.entry_weight = a.entry_weight;
  p.num_samples = a.num_samples;
  p.num_slots = a.num_slots;
  p.bank_rows = a.bank_rows;
  p.N = a.N;
  p.m_tiles = cdiv(a.max_rows, Cfg::BM);
  p.max_entries = a.max_entries;
  p.max_rank = a.max_rank;
  return run(p, g);
}

template <class Run>
lk_status expand_api(const Run& run, lk_dtype dtype, lk_dtype y_in_dtype, const ExpandArgs& a) {
  clear_error();
  if (a.num_samples < 0 || a.num_slots < 0 || a.bank_rows < 0 || a.N < 0 || a.max_rows < 0 ||
      a.max_entries < 0 || a.max_rank < 0) {
    return fail(LK_INVALID_ARGUMENT, "lk_sgmv_expand: sizes and capacities must be >= 0");
  }
  if (a.ldyi < a.N || a.ldyo < a.N || a.ldb < a.N || a.ldt < a.max_entries * a.max_rank) {
    return fail(LK_INVALID_ARGUMENT,
                "lk_sgmv_expand: leading strides too small (ldyi=%lld, ldyo=%lld, ldb=%lld need "
                ">= N=%lld; ldt=%lld needs >= max_entries*max_rank=%lld)",
                (long long)a.ldyi, (long long)a.ldyo, (long long)a.ldb, (long long)a.N,
                (long long)a.ldt, (long long)(a.max_entries * a.max_rank));
  }
  if (a.num_samples == 0 || a.max_rows == 0 || a.N == 0) return LK_OK;
  if (!a.y_in || !a.y_out || !a.row_ptr || !a.entry_ptr) {
    return fail(LK_INVALID_ARGUMENT, "lk_sgmv_expand: a required pointer is NULL");
  }
  if (a.max_entries > 0 && a.max_rank > 0 &&
      (!a.t || !a.lora_bt || !a.slot_start || !a.slot_rank || !a.slot_scale || !a.entry_slot ||
       !a.entry_weight)) {
    return fail(LK_INVALID_ARGUMENT, "lk_sgmv_expand: a required pointer is NULL");
  }
  if (y_in_dtype != dtype && y_in_dtype != LK_FLOAT32) {
    return fail(LK_INVALID_ARGUMENT,
                "lk_sgmv_expand: y_in dtype %d must be the output dtype %d or float32",
                (int)y_in_dtype, (int)dtype);
  }
  // max_rank == 0 (no adapter in this layer) still launches: the entry loop finds nothing
  // and the kernel converts y_in into y_out, which the caller may rely on.
  const bool f32_in = y_in_dtype == LK_FLOAT32;
  switch (dtype) {
    case LK_FLOAT32:
      return expand_typed<float, float>(run, a);
    case LK_FLOAT16:
      return f32_in ? expand_typed<f16, float>(run, a) : expand_typed<f16, f16>(run, a);
    case LK_BFLOAT16:
      return f32_in ? expand_typed<bf16, float>(run, a) : expand_typed<bf16, bf16>(run, a);
  }
  return fail(LK_INVALID_ARGUMENT, "lk_sgmv_expand: unknown dtype %d", (int)dtype);
}

}  // namespace lk
