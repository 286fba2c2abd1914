// SGMV shrink: t[m, j*max_rank + c] = sum_k x[m, k] * lora_a[start + c, k] (fp32 result).
//
// One block computes a BM-row x BN-rank-column tile of one mixture entry of one sample:
// grid = (samples * cdiv(max_rows, BM), max_entries, cdiv(max_rank, BN)), all host-side
// capacities. Blocks past the sample's rows, entries or rank exit at once. The K loop walks
// BK-wide slabs of x and of the adapter's A rows through shared memory; any K works (the last
// slab is zero-filled). fp16/bf16 use mma.sync m16n8k16 with fp32 accumulation, fp32 uses
// FMAs; the tile written to t is fp32 and never rounded to the input dtype.
#pragma once

#include "sgmv_common.cuh"

namespace lk {

template <class T>
struct ShrinkParams {
  const T* x;
  int64_t ldx;
  const T* lora_a;
  int64_t lda;
  float* t;
  int64_t ldt;
  const int32_t* slot_start;
  const int32_t* slot_rank;
  const int32_t* row_ptr;
  const int32_t* entry_ptr;
  const int32_t* entry_slot;
  int64_t num_samples;
  int64_t num_slots;
  int64_t bank_rows;
  int64_t K;
  int64_t m_tiles;
  int64_t max_entries;
  int64_t max_rank;
};

// Tile shape: 64 rows x 32 rank columns x 64 k, four warps stacked along the rows (16 x 32
// each). 32 rank columns cover the common LoRA ranks (4-32) in one block; larger ranks take
// more blocks along z. Shared rows are padded by 16 bytes so that the fragment loads of a
// warp (8 rows x 4 words) hit 32 different banks.
template <class T>
struct ShrinkCfg {
  static constexpr int BM = 64, BN = 32, BK = 64;
  static constexpr int WARPS_M = 4, WARPS_N = 1, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static constexpr bool kTensorCores = !same_type<T, float>::value;
  using S = typename std::conditional<kTensorCores, T, float>::type;  // shared element type
  static constexpr int LDS = BK + 16 / int(sizeof(S));
  using Op = typename std::conditional<kTensorCores, OpMma16<T, LDS, LDS>,
                                       OpSimt<LDS, LDS, true>>::type;
  using State = WarpState<Op, MT, NT>;
  struct alignas(16) Smem {
    S a[BM * LDS];  // x slab    [BM][BK]
    S b[BN * LDS];  // A rows    [BN][BK]
  };
};

struct ShrinkTile {
  int64_t row0;
  int rows;
  int64_t bank_row;  // first A row of this tile's rank columns
  int cols;          // valid rank columns in the tile (<= BN)
  int64_t t_col;     // column of t holding rank column 0 of the tile
};

template <class Cfg>
LK_HD Grid3 shrink_grid(int64_t num_samples, int64_t max_rows, int64_t max_entries,
                        int64_t max_rank) {
  return Grid3{num_samples * cdiv(max_rows, Cfg::BM), max_entries, cdiv(max_rank, Cfg::BN)};
}

// Block (bx, by, bz) -> its tile, or false when the block has nothing to do.
template <class Cfg, class T>
LK_HD bool shrink_tile(const ShrinkParams<T>& p, int64_t bx, int64_t by, int64_t bz,
                       ShrinkTile* out) {
  const SegRows seg = seg_rows(p.row_ptr, bx, p.m_tiles, Cfg::BM);
  if (seg.rows == 0) return false;
  int64_t e0;
  const int n_entries = segment_entries(p.entry_ptr, seg.seg, p.max_entries, &e0);
  if (by >= n_entries) return false;
  const EntryRef ref = resolve_entry(p.entry_slot, p.slot_start, p.slot_rank, e0 + by,
                                     p.num_slots, p.bank_rows, p.max_rank);
  const int64_t c0 = bz * Cfg::BN;
  if (c0 >= ref.rank) return false;
  out->row0 = seg.row0;
  out->rows = seg.rows;
  out->bank_row = ref.bank_row + c0;
  out->cols = static_cast<int>(min64(Cfg::BN, ref.rank - c0));
  out->t_col = by * p.max_rank + c0;
  return true;
}

// The block program. `ex` runs per-thread phases (`threads`), barriers (`sync`) and the
// warp-collective MMAs (`mma`); see DeviceExec and csrc/emulate/emulate.cpp.
template <class Cfg, class T, class Ex>
LK_HD void shrink_block(Ex& ex, typename Cfg::Smem& sm, const ShrinkParams<T>& p,
                        const ShrinkTile& tl) {
  using Op = typename Cfg::Op;
  using S = typename Cfg::S;
  ex.threads([&](int tid, typename Cfg::State& st) {
    const int warp = tid / 32;
    const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM, wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
    warp_state_init(st, tl.rows - wm0, tl.cols - wn0);
  });
  for (int64_t k0 = 0; k0 < p.K; k0 += Cfg::BK) {
    const int kvalid = static_cast<int>(min64(Cfg::BK, p.K - k0));
    ex.threads([&](int tid, typename Cfg::State&) {
      load_tile<T, S, Cfg::BM, Cfg::BK, Cfg::LDS, Cfg::THREADS, false>(
          sm.a, p.x + tl.row0 * p.ldx + k0, p.ldx, tl.rows, kvalid, 1.f, tid);
      load_tile<T, S, Cfg::BN, Cfg::BK, Cfg::LDS, Cfg::THREADS, false>(
          sm.b, p.lora_a + tl.bank_row * p.lda + k0, p.lda, tl.cols, kvalid, 1.f, tid);
    });
    ex.sync();
#pragma unroll
    for (int kk = 0; kk < Cfg::BK; kk += Op::KS) {
      if (kk < kvalid) {  // zero-filled past K: skipping is only a saving
        ex.threads([&](int tid, typename Cfg::State& st) {
          const int warp = tid / 32, lane = tid % 32;
          const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM, wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
#pragma unroll
          for (int i = 0; i < Cfg::MT; ++i) Op::load_a(sm.a, wm0 + 16 * i, kk, lane, st.a[i]);
#pragma unroll
          for (int j = 0; j < Cfg::NT; ++j) Op::load_b(sm.b, wn0 + 8 * j, kk, lane, st.b[j]);
        });
        ex.mma();
      }
    }
    ex.sync();
  }
  // Epilogue: straight from the accumulators to t (fp32). Only valid rows and rank columns
  // are written; t's other columns belong to other entries or lie past this rank.
  ex.threads([&](int tid, typename Cfg::State& st) {
    const int warp = tid / 32, lane = tid % 32;
    const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM, wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int i = 0; i < Cfg::MT; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::NT; ++j) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int r = wm0 + 16 * i + g + 8 * (v >> 1);
          const int c = wn0 + 8 * j + 2 * q + (v & 1);
          if (r < tl.rows && c < tl.cols) {
            p.t[(tl.row0 + r) * p.ldt + tl.t_col + c] = st.c[i][j][v];
          }
        }
      }
    }
  });
}

}  // namespace lk
