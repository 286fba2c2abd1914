// Shared pieces of the SGMV shrink/expand kernels: dtype conversion, tile loaders, the three
// warp-level multiply policies and the block-to-tile index arithmetic.
//
// Everything here is written once as __host__ __device__ code so that the kernel bodies in
// sgmv_shrink.cuh / sgmv_expand.cuh compile both for the GPU (nvcc, sgmv_*.cu) and for the
// host (g++, csrc/emulate/emulate.cpp). The host build runs the same bodies over an emulated
// grid, with the tensor-core instructions replaced by a transcription of their PTX fragment
// layouts, so that the index arithmetic is checked on a machine without a GPU.
//
// No torch headers: the library is a plain C ABI (csrc/include/lorakernels.h).
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lk {

using bf16 = __nv_bfloat16;
using f16 = __half;

// ---------------------------------------------------------------------------------------------
// Scalars and raw copies
// ---------------------------------------------------------------------------------------------

LK_HD float to_f32(float v) { return v; }
LK_HD float to_f32(f16 v) { return __half2float(v); }
LK_HD float to_f32(bf16 v) { return __bfloat162float(v); }

template <class T>
LK_HD T from_f32(float v);
template <>
LK_HD float from_f32<float>(float v) { return v; }
template <>
LK_HD f16 from_f32<f16>(float v) { return __float2half_rn(v); }
template <>
LK_HD bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

template <class A, class B>
struct same_type {
  static constexpr bool value = false;
};
template <class A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

LK_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
LK_HD int imin(int a, int b) { return a < b ? a : b; }
LK_HD int imax(int a, int b) { return a > b ? a : b; }
LK_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// BYTES-wide copy between suitably aligned addresses. On the device it is one vector memory
// instruction; on the host memcpy keeps the emulation free of aliasing tricks.
template <int BYTES>
LK_HD void copy_bytes(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  if constexpr (BYTES == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
  } else if constexpr (BYTES == 4) {
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
  } else {
    static_assert(BYTES == 2, "copy_bytes: 2, 4, 8 or 16 bytes");
    *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
  }
#else
  memcpy(dst, src, BYTES);
#endif
}

LK_HD uint32_t load_u32(const void* p) {
  uint32_t v;
  copy_bytes<4>(&v, p);
  return v;
}

LK_HD uint32_t f32_bits(float v) {
  uint32_t u;
  copy_bytes<4>(&u, &v);
  return u;
}

LK_HD float bits_f32(uint32_t u) {
  float v;
  copy_bytes<4>(&v, &u);
  return v;
}

// fp32 -> tf32, round to nearest with ties away from zero (PTX cvt.rna.tf32.f32). The result
// keeps the fp32 exponent and the top 10 mantissa bits; the low 13 bits are zero.
LK_HD uint32_t to_tf32(float v) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
#else
  uint32_t u = f32_bits(v);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // finite: add half an ulp of tf32, then truncate
    u += 0x1000u;
  }
  return u & 0xffffe000u;
#endif
}

// ---------------------------------------------------------------------------------------------
// Global -> shared tile loader
// ---------------------------------------------------------------------------------------------

// Copies the ROWS x COLS tile at `src` (row-major, leading stride `ld`, unit column stride)
// into `dst` (row-major, leading stride LDS) converting T -> D and multiplying by `scale`
// when SCALED. Elements with row >= rows_valid or col >= cols_valid are written as zero, so
// every element of the tile is written on every call (the MMA may read the whole tile, and
// zeros beyond the valid region contribute nothing).
//
// The tile is cut into 16-byte chunks of VEC = 16 / sizeof(T) elements, chunk c handled by
// thread c % THREADS; a chunk uses one vector load when the whole chunk is valid and `src`
// is 16-byte aligned with ld a multiple of VEC (runtime check: any K, N and any stride work,
// the aligned case is just faster).
template <class T, class D, int ROWS, int COLS, int LDS, int THREADS, bool SCALED>
LK_HD void load_tile(D* dst, const T* src, int64_t ld, int rows_valid, int cols_valid,
                     float scale, int tid) {
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int CPR = COLS / VEC;  // chunks per row
  constexpr int CHUNKS = ROWS * CPR;
  static_assert(COLS % VEC == 0, "tile width must be a multiple of a 16-byte chunk");
  static_assert(CHUNKS % THREADS == 0, "chunks must split evenly over the block");
  static_assert((LDS * sizeof(D)) % 16 == 0, "shared rows must stay 16-byte aligned");
  const bool vec = (reinterpret_cast<uintptr_t>(src) % 16 == 0) && (ld % VEC == 0);
#pragma unroll
  for (int i = 0; i < CHUNKS / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int r = c / CPR;
    const int col = (c % CPR) * VEC;
    // alignas(16): copy_bytes<16> reinterprets these as uint4, which needs a 16-byte aligned
    // address if the array ever lives in local memory instead of registers.
    alignas(16) T v[VEC];
    if (r < rows_valid && vec && col + VEC <= cols_valid) {
      copy_bytes<16>(v, src + r * ld + col);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[e] = (r < rows_valid && col + e < cols_valid) ? src[r * ld + col + e] : from_f32<T>(0.f);
      }
    }
    D* d = dst + r * LDS + col;
    if constexpr (same_type<T, D>::value && !SCALED) {
      copy_bytes<16>(d, v);
    } else {
      alignas(16) D w[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float f = to_f32(v[e]);
        if constexpr (SCALED) f *= scale;
        w[e] = from_f32<D>(f);
      }
#pragma unroll
      for (int e = 0; e < VEC * int(sizeof(D)); e += 16) {
        copy_bytes<16>(reinterpret_cast<char*>(d) + e, reinterpret_cast<const char*>(w) + e);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-level multiply policies. All three produce the accumulator layout of mma.m16n8: lane
// (g = lane / 4, q = lane % 4) holds c[0], c[1] at row g, columns 2q, 2q+1 of a 16x8 tile and
// c[2], c[3] at row g + 8. A is shared [m][k] (k contiguous, leading stride LDA).
// ---------------------------------------------------------------------------------------------

// fp16 / bf16 tensor cores: mma.sync.m16n8k16, fp32 accumulation. B is shared [n][k].
template <class T, int LDA, int LDB>
struct OpMma16 {
  static constexpr int KS = 16;
  static constexpr bool kCollective = true;
  struct FragA {
    uint32_t r[4];
  };
  struct FragB {
    uint32_t r[2];
  };
  using SmemA = T;
  using SmemB = T;

  // PTX ISA "Matrix Fragments for mma.m16n8k16" (.f16/.bf16): a0..a7 packed two per register;
  // a0,a1 / a4,a5 at row g, a2,a3 / a6,a7 at row g+8; columns 2q + {0,1}, +8 for a4..a7.
  static LK_HD void load_a(const T* s, int m0, int k0, int lane, FragA& a) {
    const int g = lane >> 2, q = lane & 3;
    const T* p = s + (m0 + g) * LDA + k0 + 2 * q;
    a.r[0] = load_u32(p);
    a.r[1] = load_u32(p + 8 * LDA);
    a.r[2] = load_u32(p + 8);
    a.r[3] = load_u32(p + 8 * LDA + 8);
  }
  // b0,b1 at k = 2q + {0,1}, b2,b3 at k + 8; column n = g.
  static LK_HD void load_b(const T* s, int n0, int k0, int lane, FragB& b) {
    const int g = lane >> 2, q = lane & 3;
    const T* p = s + (n0 + g) * LDB + k0 + 2 * q;
    b.r[0] = load_u32(p);
    b.r[1] = load_u32(p + 8);
  }
#if defined(__CUDACC__)
  static __device__ __forceinline__ void mma(float (&c)[4], const FragA& a, const FragB& b) {
    if constexpr (same_type<T, f16>::value) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
    }
  }
#endif
};

// fp32 A times a 16-bit B on tf32 tensor cores, without rounding A to 16 bits: A = hi + lo
// with hi = tf32(A), lo = tf32(A - hi), two mma.sync.m16n8k8 per step (A ~ 22 mantissa bits).
// B holds fp16/bf16 values widened to fp32, which tf32 represents exactly (10 mantissa bits
// and fp32's exponent range). B is shared [k][n] (n contiguous).
template <int LDA, int LDB>
struct OpTf32Split {
  static constexpr int KS = 8;
  static constexpr bool kCollective = true;
  struct FragA {
    uint32_t hi[4];
    uint32_t lo[4];
  };
  struct FragB {
    uint32_t r[2];
  };
  using SmemA = float;
  using SmemB = float;

  // PTX ISA "Matrix Fragments for mma.m16n8k8" (.tf32): a0 (g, q), a1 (g+8, q), a2 (g, q+4),
  // a3 (g+8, q+4); b0 (k = q, n = g), b1 (k = q+4, n = g).
  static LK_HD void load_a(const float* s, int m0, int k0, int lane, FragA& a) {
    const int g = lane >> 2, q = lane & 3;
    const float* p = s + (m0 + g) * LDA + k0 + q;
    const float v[4] = {p[0], p[8 * LDA], p[4], p[8 * LDA + 4]};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a.hi[i] = to_tf32(v[i]);
      a.lo[i] = to_tf32(v[i] - bits_f32(a.hi[i]));
    }
  }
  static LK_HD void load_b(const float* s, int n0, int k0, int lane, FragB& b) {
    const int g = lane >> 2, q = lane & 3;
    const float* p = s + (k0 + q) * LDB + n0 + g;
    b.r[0] = f32_bits(p[0]);
    b.r[1] = f32_bits(p[4 * LDB]);
  }
#if defined(__CUDACC__)
  static __device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4],
                                                  const FragB& b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const FragA& a, const FragB& b) {
    mma_tf32(c, a.lo, b);  // small part first: it is the one that rounding would lose
    mma_tf32(c, a.hi, b);
  }
#endif
};

// fp32 inputs: CUDA-core FMAs in the same accumulator layout, one k per step, so that fp32
// results are fp32-exact (tf32 tensor cores would round the inputs). B is shared [n][k]
// (B_NK) or [k][n].
template <int LDA, int LDB, bool B_NK>
struct OpSimt {
  static constexpr int KS = 1;
  static constexpr bool kCollective = false;
  struct FragA {
    float v[2];
  };
  struct FragB {
    float v[2];
  };
  using SmemA = float;
  using SmemB = float;

  static LK_HD void load_a(const float* s, int m0, int k, int lane, FragA& a) {
    const int g = lane >> 2;
    a.v[0] = s[(m0 + g) * LDA + k];
    a.v[1] = s[(m0 + g + 8) * LDA + k];
  }
  static LK_HD void load_b(const float* s, int n0, int k, int lane, FragB& b) {
    const int n = n0 + 2 * (lane & 3);
    if constexpr (B_NK) {
      b.v[0] = s[n * LDB + k];
      b.v[1] = s[(n + 1) * LDB + k];
    } else {
      b.v[0] = s[k * LDB + n];
      b.v[1] = s[k * LDB + n + 1];
    }
  }
  static LK_HD void mma(float (&c)[4], const FragA& a, const FragB& b) {
    c[0] = fmaf(a.v[0], b.v[0], c[0]);
    c[1] = fmaf(a.v[0], b.v[1], c[1]);
    c[2] = fmaf(a.v[1], b.v[0], c[2]);
    c[3] = fmaf(a.v[1], b.v[1], c[3]);
  }
};

// Per-thread state of a warp tile: MT x NT accumulators of 16x8, the current fragments, and
// how many of the 16-row / 8-column sub-tiles hold valid data (warp-uniform: a warp skips
// the MMAs of sub-tiles that lie wholly past the rows of its sample or past the rank/N).
template <class Op, int MT, int NT>
struct WarpState {
  using OpT = Op;
  static constexpr int kMT = MT;
  static constexpr int kNT = NT;
  typename Op::FragA a[MT];
  typename Op::FragB b[NT];
  float c[MT][NT][4];
  int mt_active;
  int nt_active;
};

template <class St>
LK_HD void warp_state_init(St& st, int rows_from_warp, int cols_from_warp) {
  st.mt_active = imax(0, imin(St::kMT, (rows_from_warp + 15) / 16));
  st.nt_active = imax(0, imin(St::kNT, (cols_from_warp + 7) / 8));
#pragma unroll
  for (int i = 0; i < St::kMT; ++i)
#pragma unroll
    for (int j = 0; j < St::kNT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) st.c[i][j][v] = 0.f;
}

#if defined(__CUDACC__)
// One lane's share of the warp's MMAs (every lane of a warp calls this together).
template <class St>
__device__ __forceinline__ void warp_mma_lane(St& st) {
#pragma unroll
  for (int i = 0; i < St::kMT; ++i) {
#pragma unroll
    for (int j = 0; j < St::kNT; ++j) {
      if (i < st.mt_active && j < st.nt_active) St::OpT::mma(st.c[i][j], st.a[i], st.b[j]);
    }
  }
}

// Execution policy of the GPU build: "for every thread" is the calling thread itself.
template <class St>
struct DeviceExec {
  St st;
  template <class F>
  __device__ __forceinline__ void threads(F&& f) {
    f(static_cast<int>(threadIdx.x), st);
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ void mma() { warp_mma_lane(st); }
};
#endif

// ---------------------------------------------------------------------------------------------
// Index arithmetic shared by both kernels and the emulator
// ---------------------------------------------------------------------------------------------

// The grid's x axis enumerates (sample, row tile) pairs: every sample gets
// cdiv(max_rows, BM) row tiles, of which those past the sample's rows exit at once. So the
// grid depends on host-side capacities only (CUDA-graph safe) and a tile never straddles
// two samples (one mixture per tile).
struct SegRows {
  int64_t seg;   // sample index
  int64_t row0;  // first row of the tile
  int rows;      // valid rows in the tile (<= BM); 0 means the tile is idle
};

LK_HD SegRows seg_rows(const int32_t* row_ptr, int64_t bx, int64_t m_tiles, int bm) {
  SegRows t;
  t.seg = bx / m_tiles;
  const int64_t mt = bx - t.seg * m_tiles;
  const int64_t begin = row_ptr[t.seg];
  const int64_t end = row_ptr[t.seg + 1];
  t.row0 = begin + mt * bm;
  const int64_t left = end - t.row0;
  t.rows = left <= 0 ? 0 : static_cast<int>(min64(left, bm));
  return t;
}

// One mixture entry resolved to its adapter rows. Invalid references (slot out of range,
// rank above the launch capacity, rows past the bank) are skipped, never read.
struct EntryRef {
  int64_t slot;
  int64_t bank_row;  // first bank row of the adapter
  int rank;          // 0 = nothing to do
};

LK_HD EntryRef resolve_entry(const int32_t* entry_slot, const int32_t* slot_start,
                             const int32_t* slot_rank, int64_t e, int64_t num_slots,
                             int64_t bank_rows, int64_t max_rank) {
  EntryRef r{0, 0, 0};
  const int64_t l = entry_slot[e];
  if (l < 0 || l >= num_slots) return r;
  const int64_t rank = slot_rank[l];
  const int64_t start = slot_start[l];
  if (rank <= 0 || rank > max_rank || start < 0 || start + rank > bank_rows) return r;
  r.slot = l;
  r.bank_row = start;
  r.rank = static_cast<int>(rank);
  return r;
}

// Mixture entries of a sample, at most `max_entries` of them (the width of t).
LK_HD int segment_entries(const int32_t* entry_ptr, int64_t seg, int64_t max_entries,
                          int64_t* first) {
  *first = entry_ptr[seg];
  const int64_t n = entry_ptr[seg + 1] - *first;
  return n <= 0 ? 0 : static_cast<int>(min64(n, max_entries));
}

struct Grid3 {
  int64_t x, y, z;
};

}  // namespace lk
