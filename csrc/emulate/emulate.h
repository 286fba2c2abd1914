// Host emulation of the SGMV kernels: the *same* block programs as the GPU build
// (csrc/cuda/sgmv_shrink.cuh, sgmv_expand.cuh), compiled by the host C++ compiler and run over
// every block of the launch grid, one emulated thread at a time between barriers.
//
// What is real: the grid shape, block -> (sample, rows, entry, rank, columns) arithmetic,
// every global and shared-memory offset, the loaders' predicates and vector/scalar choice,
// the fragment loads, the epilogues and the C ABI's argument checks (sgmv_api.h). What is
// emulated: the warp-collective mma.sync instructions, replaced by a transcription of the PTX
// ISA fragment layouts (per-lane register -> matrix element tables) and an fp64 product
// rounded to fp32.
#pragma once

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sgmv_api.h"

namespace lk_emu {

[[noreturn]] inline void die(const std::string& msg) {
  fprintf(stderr, "lk_emulate: %s\n", msg.c_str());
  abort();
}

// ---- emulated warp-collective MMAs ------------------------------------------------------

template <class Op>
struct OpKind {
  static constexpr int value = 0;  // SIMT: no collective
};
template <class T, int A, int B>
struct OpKind<lk::OpMma16<T, A, B>> {
  static constexpr int value = 16;
  using Elem = T;
};
template <int A, int B>
struct OpKind<lk::OpTf32Split<A, B>> {
  static constexpr int value = 8;
};

template <class T>
float half_bits(uint32_t reg, int h) {
  const uint16_t bits = static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffffu);
  T v;
  memcpy(&v, &bits, 2);
  return lk::to_f32(v);
}

inline float tf32_operand(uint32_t reg) { return lk::bits_f32(reg & 0xffffe000u); }  // low bits ignored

// D = C + A(16 x k) * B(k x 8), from per-lane fragments decoded by the PTX tables; the
// accumulator layout is c_v at row g + 8 * (v >> 1), column 2q + (v & 1).
template <int KS, class St, class DecodeA, class DecodeB>
void mma_16x8(St* lanes, int i, int j, DecodeA&& decode_a, DecodeB&& decode_b) {
  double A[16][KS] = {};
  double B[KS][8] = {};
  for (int L = 0; L < 32; ++L) decode_a(L, lanes[L].a[i], A);
  for (int L = 0; L < 32; ++L) decode_b(L, lanes[L].b[j], B);
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, q = L & 3;
    for (int v = 0; v < 4; ++v) {
      const int m = g + 8 * (v >> 1), n = 2 * q + (v & 1);
      double acc = lanes[L].c[i][j][v];
      for (int k = 0; k < KS; ++k) acc += A[m][k] * B[k][n];
      lanes[L].c[i][j][v] = static_cast<float>(acc);
    }
  }
}

template <class St>
void emulate_warp(St* lanes) {
  using Op = typename St::OpT;
  for (int L = 1; L < 32; ++L) {  // the skip decisions must be warp-uniform
    if (lanes[L].mt_active != lanes[0].mt_active || lanes[L].nt_active != lanes[0].nt_active) {
      die("mt_active / nt_active differ between lanes of one warp");
    }
  }
  for (int i = 0; i < St::kMT; ++i) {
    for (int j = 0; j < St::kNT; ++j) {
      if (i >= lanes[0].mt_active || j >= lanes[0].nt_active) continue;
      if constexpr (OpKind<Op>::value == 16) {
        using T = typename OpKind<Op>::Elem;
        // m16n8k16 .f16/.bf16: register r holds a_{2r}, a_{2r+1}: row g + 8 (r & 1),
        // column 2q + h + 8 (r >> 1); B register r holds b_{2r}, b_{2r+1}: k = 2q + h + 8r, n = g.
        mma_16x8<16>(
            lanes, i, j,
            [](int L, const typename Op::FragA& f, double (&A)[16][16]) {
              const int g = L >> 2, q = L & 3;
              for (int r = 0; r < 4; ++r)
                for (int h = 0; h < 2; ++h)
                  A[g + 8 * (r & 1)][2 * q + h + 8 * (r >> 1)] = half_bits<T>(f.r[r], h);
            },
            [](int L, const typename Op::FragB& f, double (&B)[16][8]) {
              const int g = L >> 2, q = L & 3;
              for (int r = 0; r < 2; ++r)
                for (int h = 0; h < 2; ++h) B[2 * q + h + 8 * r][g] = half_bits<T>(f.r[r], h);
            });
      } else if constexpr (OpKind<Op>::value == 8) {
        // m16n8k8 .tf32: a_r at row g + 8 (r & 1), column q + 4 (r >> 1); b_r at k = q + 4r,
        // n = g. Two instructions: the lo part, then the hi part.
        for (int part = 0; part < 2; ++part) {
          mma_16x8<8>(
              lanes, i, j,
              [part](int L, const typename Op::FragA& f, double (&A)[16][8]) {
                const int g = L >> 2, q = L & 3;
                for (int r = 0; r < 4; ++r)
                  A[g + 8 * (r & 1)][q + 4 * (r >> 1)] = tf32_operand(part ? f.hi[r] : f.lo[r]);
              },
              [](int L, const typename Op::FragB& f, double (&B)[8][8]) {
                const int g = L >> 2, q = L & 3;
                for (int r = 0; r < 2; ++r) B[q + 4 * r][g] = tf32_operand(f.r[r]);
              });
        }
      } else {
        for (int L = 0; L < 32; ++L) Op::mma(lanes[L].c[i][j], lanes[L].a[i], lanes[L].b[j]);
      }
    }
  }
}

// Runs each phase for all THREADS emulated threads in order; a barrier is then a no-op.
template <class St, int THREADS>
struct HostExec {
  std::vector<St> st;
  HostExec() : st(THREADS) {}
  template <class F>
  void threads(F&& f) {
    for (int tid = 0; tid < THREADS; ++tid) f(tid, st[tid]);
  }
  void sync() {}
  void mma() {
    for (int w = 0; w < THREADS / 32; ++w) emulate_warp(&st[w * 32]);
  }
};

template <class Smem>
std::unique_ptr<Smem> poisoned_smem() {
  auto sm = std::make_unique<Smem>();
  memset(sm.get(), 0xff, sizeof(Smem));  // NaN in fp32, fp16 and bf16: unwritten reads show
  return sm;
}

// The `run` functor of sgmv_api.h for the host: every block of the grid, in order.
struct HostRun {
  template <class T>
  lk_status operator()(const lk::ShrinkParams<T>& p, lk::Grid3 g) const {
    using Cfg = lk::ShrinkCfg<T>;
    for (int64_t bz = 0; bz < g.z; ++bz)
      for (int64_t by = 0; by < g.y; ++by)
        for (int64_t bx = 0; bx < g.x; ++bx) {
          lk::ShrinkTile tl;
          if (!lk::shrink_tile<Cfg>(p, bx, by, bz, &tl)) continue;
          auto sm = poisoned_smem<typename Cfg::Smem>();
          HostExec<typename Cfg::State, Cfg::THREADS> ex;
          lk::shrink_block<Cfg>(ex, *sm, p, tl);
        }
    return LK_OK;
  }
  template <class T, class Tin>
  lk_status operator()(const lk::ExpandParams<T, Tin>& p, lk::Grid3 g) const {
    using Cfg = lk::ExpandCfg<T>;
    for (int64_t by = 0; by < g.y; ++by)
      for (int64_t bx = 0; bx < g.x; ++bx) {
        lk::ExpandTile tl;
        if (!lk::expand_tile<Cfg>(p, bx, by, &tl)) continue;
        auto sm = poisoned_smem<typename Cfg::Smem>();
        HostExec<typename Cfg::State, Cfg::THREADS> ex;
        lk::expand_block<Cfg>(ex, *sm, p, tl);
      }
    return LK_OK;
  }
};

}  // namespace lk_emu
