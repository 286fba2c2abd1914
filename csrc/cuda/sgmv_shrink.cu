// SGMV shrink kernels (one per input dtype) and the lk_sgmv_shrink entry point.
#include "launch.h"

namespace lk {

template <class T>
__device__ __forceinline__ void shrink_kernel_impl(const ShrinkParams<T>& p) {
  using Cfg = ShrinkCfg<T>;
  ShrinkTile tl;
  if (!shrink_tile<Cfg>(p, blockIdx.x, blockIdx.y, blockIdx.z, &tl)) return;
  __shared__ typename Cfg::Smem sm;
  DeviceExec<typename Cfg::State> ex;
  shrink_block<Cfg>(ex, sm, p, tl);
}

}  // namespace lk

// Plain C names so that ptxas / cuobjdump reports read "lk_shrink_<dtype>".
#define LK_SHRINK_KERNEL(NAME, T)                                         \
  extern "C" __global__ void __launch_bounds__(lk::ShrinkCfg<T>::THREADS) \
      NAME(const lk::ShrinkParams<T> p) {                                 \
    lk::shrink_kernel_impl<T>(p);                                         \
  }

LK_SHRINK_KERNEL(lk_shrink_f32, float)
LK_SHRINK_KERNEL(lk_shrink_f16, lk::f16)
LK_SHRINK_KERNEL(lk_shrink_bf16, lk::bf16)

namespace {

void (*shrink_kernel(float*))(const lk::ShrinkParams<float>) { return lk_shrink_f32; }
void (*shrink_kernel(lk::f16*))(const lk::ShrinkParams<lk::f16>) { return lk_shrink_f16; }
void (*shrink_kernel(lk::bf16*))(const lk::ShrinkParams<lk::bf16>) { return lk_shrink_bf16; }

struct DeviceRun {
  cudaStream_t stream;
  template <class T>
  lk_status operator()(const lk::ShrinkParams<T>& p, lk::Grid3 g) const {
    const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y),
                    static_cast<unsigned>(g.z));
    shrink_kernel(static_cast<T*>(nullptr))<<<grid, lk::ShrinkCfg<T>::THREADS, 0, stream>>>(p);
    return lk::check_cuda(cudaGetLastError(), "lk_sgmv_shrink: kernel launch failed");
  }
};

}  // namespace

extern "C" lk_status lk_sgmv_shrink(lk_dtype dtype, const void* x, int64_t ldx,
                                    const void* lora_a, int64_t lda, float* t, int64_t ldt,
                                    const int32_t* slot_start, const int32_t* slot_rank,
                                    const int32_t* row_ptr, const int32_t* entry_ptr,
                                    const int32_t* entry_slot, int64_t num_samples,
                                    int64_t num_slots, int64_t bank_rows, int64_t K,
                                    int64_t max_rows, int64_t max_entries, int64_t max_rank,
                                    void* stream) {
  return lk::shrink_api(DeviceRun{static_cast<cudaStream_t>(stream)}, dtype, x, ldx, lora_a, lda,
                        t, ldt, slot_start, slot_rank, row_ptr, entry_ptr, entry_slot,
                        num_samples, num_slots, bank_rows, K, max_rows, max_entries, max_rank);
}
