// SGMV expand: y_out[m, n] = y_in[m, n]
//                 + sum_j w[e] * scale[l] * sum_c t[m, j*max_rank + c] * lora_bt[start + c, n]
//
// One block owns a BM x BN tile of the output for one sample: grid =
// (samples * cdiv(max_rows, BM), cdiv(N, BN)), host-side capacities only. It loops over the
// sample's mixture entries and, inside each, over BK-wide chunks of that adapter's rank, so
// the reduction length is the sum of the real ranks (heterogeneous ranks cost nothing
// extra). Every row covered by row_ptr is written, also when its sample has no entry, so
// y_in may be a separate fp32 buffer (one rounding at the end) or y_out itself (in place).
//
// Numerics: t is fp32 and stays fp32. fp16/bf16 run on tf32 tensor cores with t split as
// hi + lo (two MMAs; ~22 of t's 24 mantissa bits kept, B exact); fp32 uses FMAs. The
// strength * scale factor is folded into t on its way to shared memory (one fp32 multiply).
#pragma once

#include "sgmv_common.cuh"

namespace lk {

template <class T, class Tin>
struct ExpandParams {
  const Tin* y_in;
  int64_t ldyi;
  T* y_out;
  int64_t ldyo;
  const float* t;
  int64_t ldt;
  const T* lora_bt;
  int64_t ldb;
  const int32_t* slot_start;
  const int32_t* slot_rank;
  const float* slot_scale;
  const int32_t* row_ptr;
  const int32_t* entry_ptr;
  const int32_t* entry_slot;
  const float* entry_weight;
  int64_t num_samples;
  int64_t num_slots;
  int64_t bank_rows;
  int64_t N;
  int64_t m_tiles;
  int64_t max_entries;
  int64_t max_rank;
};

// Tile shape: 64 x 64 outputs, rank chunks of 32, four warps as 2 x 2 (32 x 32 each).
// Shared A = t chunk [BM][BK] fp32, B = lora_bt chunk [BK][BN] widened to fp32, C = the
// output tile for the coalesced epilogue (aliases A and B once the reduction is done).
template <class T>
struct ExpandCfg {
  static constexpr int BM = 64, BN = 64, BK = 32;
  static constexpr int WARPS_M = 2, WARPS_N = 2, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static constexpr int LDA = BK + 4, LDB = BN + 8, LDC = BN + 4;  // bank-conflict padding
  static constexpr bool kTensorCores = !same_type<T, float>::value;
  using Op = typename std::conditional<kTensorCores, OpTf32Split<LDA, LDB>,
                                       OpSimt<LDA, LDB, false>>::type;
  using State = WarpState<Op, MT, NT>;
  struct alignas(16) Smem {
    union {
      struct {
        float a[BM * LDA];
        float b[BK * LDB];
      } ab;
      float c[BM * LDC];
    };
  };
  static constexpr int OUT_VEC = 4;  // outputs per epilogue chunk
};

struct ExpandTile {
  int64_t seg;
  int64_t row0;
  int rows;
  int64_t n0;
  int cols;  // valid output columns (<= BN)
};

template <class Cfg>
LK_HD Grid3 expand_grid(int64_t num_samples, int64_t max_rows, int64_t N) {
  return Grid3{num_samples * cdiv(max_rows, Cfg::BM), cdiv(N, Cfg::BN), 1};
}

template <class Cfg, class P>
LK_HD bool expand_tile(const P& p, int64_t bx, int64_t by, ExpandTile* out) {
  const SegRows seg = seg_rows(p.row_ptr, bx, p.m_tiles, Cfg::BM);
  if (seg.rows == 0) return false;
  out->seg = seg.seg;
  out->row0 = seg.row0;
  out->rows = seg.rows;
  out->n0 = by * Cfg::BN;
  out->cols = static_cast<int>(min64(Cfg::BN, p.N - out->n0));
  return out->cols > 0;
}

// Epilogue loads/stores of OUT_VEC consecutive elements; vectorized when aligned.
template <class X, int V>
LK_HD void load_vec_f32(float (&dst)[V], const X* src, int valid, bool vec) {
  if (vec && valid >= V) {
    alignas(16) X v[V];  // read as uint2/uint4 by copy_bytes
    copy_bytes<V * int(sizeof(X))>(v, src);
#pragma unroll
    for (int e = 0; e < V; ++e) dst[e] = to_f32(v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) dst[e] = e < valid ? to_f32(src[e]) : 0.f;
  }
}

template <class X, int V>
LK_HD void store_vec_f32(X* dst, const float (&src)[V], int valid, bool vec) {
  alignas(16) X v[V];  // written as uint2/uint4 by copy_bytes
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = from_f32<X>(src[e]);
  if (vec && valid >= V) {
    copy_bytes<V * int(sizeof(X))>(dst, v);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < valid) dst[e] = v[e];
    }
  }
}

template <class Cfg, class T, class Tin, class Ex>
LK_HD void expand_block(Ex& ex, typename Cfg::Smem& sm, const ExpandParams<T, Tin>& p,
                        const ExpandTile& tl) {
  using Op = typename Cfg::Op;
  ex.threads([&](int tid, typename Cfg::State& st) {
    const int warp = tid / 32;
    const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM, wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
    warp_state_init(st, tl.rows - wm0, tl.cols - wn0);
  });
  int64_t e0;
  const int n_entries = segment_entries(p.entry_ptr, tl.seg, p.max_entries, &e0);
  for (int j = 0; j < n_entries; ++j) {
    const EntryRef ref = resolve_entry(p.entry_slot, p.slot_start, p.slot_rank, e0 + j,
                                       p.num_slots, p.bank_rows, p.max_rank);
    if (ref.rank == 0) continue;
    const float coef = p.entry_weight[e0 + j] * p.slot_scale[ref.slot];
    const float* t_tile = p.t + tl.row0 * p.ldt + j * p.max_rank;
    for (int k0 = 0; k0 < ref.rank; k0 += Cfg::BK) {
      const int kvalid = imin(Cfg::BK, ref.rank - k0);
      ex.threads([&](int tid, typename Cfg::State&) {
        // t columns past the rank may hold anything (even NaN): they are zero-filled here,
        // never read.
        load_tile<float, float, Cfg::BM, Cfg::BK, Cfg::LDA, Cfg::THREADS, true>(
            sm.ab.a, t_tile + k0, p.ldt, tl.rows, kvalid, coef, tid);
        load_tile<T, float, Cfg::BK, Cfg::BN, Cfg::LDB, Cfg::THREADS, false>(
            sm.ab.b, p.lora_bt + (ref.bank_row + k0) * p.ldb + tl.n0, p.ldb, kvalid, tl.cols,
            1.f, tid);
      });
      ex.sync();
#pragma unroll
      for (int kk = 0; kk < Cfg::BK; kk += Op::KS) {
        if (kk < kvalid) {
          ex.threads([&](int tid, typename Cfg::State& st) {
            const int warp = tid / 32, lane = tid % 32;
            const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM;
            const int wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
#pragma unroll
            for (int i = 0; i < Cfg::MT; ++i) {
              Op::load_a(sm.ab.a, wm0 + 16 * i, kk, lane, st.a[i]);
            }
#pragma unroll
            for (int jj = 0; jj < Cfg::NT; ++jj) {
              Op::load_b(sm.ab.b, wn0 + 8 * jj, kk, lane, st.b[jj]);
            }
          });
          ex.mma();
        }
      }
      ex.sync();
    }
  }
  // Epilogue: accumulators -> shared C tile -> rows of OUT_VEC outputs per thread, so that a
  // warp reads y_in and writes y_out in contiguous row segments.
  ex.threads([&](int tid, typename Cfg::State& st) {
    const int warp = tid / 32, lane = tid % 32;
    const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WM, wn0 = (warp % Cfg::WARPS_N) * Cfg::WN;
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int i = 0; i < Cfg::MT; ++i) {
#pragma unroll
      for (int jj = 0; jj < Cfg::NT; ++jj) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int r = wm0 + 16 * i + g + 8 * (v >> 1);
          const int c = wn0 + 8 * jj + 2 * q + (v & 1);
          sm.c[r * Cfg::LDC + c] = st.c[i][jj][v];
        }
      }
    }
  });
  ex.sync();
  ex.threads([&](int tid, typename Cfg::State&) {
    constexpr int V = Cfg::OUT_VEC;
    constexpr int CPR = Cfg::BN / V;
    constexpr int CHUNKS = Cfg::BM * CPR;
    static_assert(CHUNKS % Cfg::THREADS == 0, "epilogue chunks must split evenly");
    const Tin* yi = p.y_in + tl.row0 * p.ldyi + tl.n0;
    T* yo = p.y_out + tl.row0 * p.ldyo + tl.n0;
    const bool vec_in = reinterpret_cast<uintptr_t>(yi) % (V * sizeof(Tin)) == 0 && p.ldyi % V == 0;
    const bool vec_out = reinterpret_cast<uintptr_t>(yo) % (V * sizeof(T)) == 0 && p.ldyo % V == 0;
#pragma unroll
    for (int i = 0; i < CHUNKS / Cfg::THREADS; ++i) {
      const int ch = tid + i * Cfg::THREADS;
      const int r = ch / CPR;
      const int c = (ch % CPR) * V;
      if (r < tl.rows && c < tl.cols) {
        const int valid = imin(V, tl.cols - c);
        float acc[V];
        load_vec_f32<Tin, V>(acc, yi + r * p.ldyi + c, valid, vec_in);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += sm.c[r * Cfg::LDC + c + e];
        store_vec_f32<T, V>(yo + r * p.ldyo + c, acc, valid, vec_out);
      }
    }
  });
}

}  // namespace lk
