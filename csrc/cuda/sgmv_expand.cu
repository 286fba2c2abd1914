// SGMV expand kernels (output dtype x y_in dtype) and the lk_sgmv_expand entry point.
#include "launch.h"

namespace lk {

template <class T, class Tin>
__device__ __forceinline__ void expand_kernel_impl(const ExpandParams<T, Tin>& p) {
  using Cfg = ExpandCfg<T>;
  ExpandTile tl;
  if (!expand_tile<Cfg>(p, blockIdx.x, blockIdx.y, &tl)) return;
  __shared__ typename Cfg::Smem sm;
  DeviceExec<typename Cfg::State> ex;
  expand_block<Cfg>(ex, sm, p, tl);
}

}  // namespace lk

// Plain C names so that ptxas / cuobjdump reports read "lk_expand_<out>_<y_in>".
#define LK_EXPAND_KERNEL(NAME, T, TIN)                                    \
  extern "C" __global__ void __launch_bounds__(lk::ExpandCfg<T>::THREADS) \
      NAME(const lk::ExpandParams<T, TIN> p) {                            \
    lk::expand_kernel_impl<T, TIN>(p);                                    \
  }

LK_EXPAND_KERNEL(lk_expand_f32_f32, float, float)
LK_EXPAND_KERNEL(lk_expand_f16_f16, lk::f16, lk::f16)
LK_EXPAND_KERNEL(lk_expand_f16_f32, lk::f16, float)
LK_EXPAND_KERNEL(lk_expand_bf16_bf16, lk::bf16, lk::bf16)
LK_EXPAND_KERNEL(lk_expand_bf16_f32, lk::bf16, float)

namespace {

template <class T, class Tin>
using ExpandKernel = void (*)(const lk::ExpandParams<T, Tin>);

ExpandKernel<float, float> expand_kernel(float*, float*) { return lk_expand_f32_f32; }
ExpandKernel<lk::f16, lk::f16> expand_kernel(lk::f16*, lk::f16*) { return lk_expand_f16_f16; }
ExpandKernel<lk::f16, float> expand_kernel(lk::f16*, float*) { return lk_expand_f16_f32; }
ExpandKernel<lk::bf16, lk::bf16> expand_kernel(lk::bf16*, lk::bf16*) {
  return lk_expand_bf16_bf16;
}
ExpandKernel<lk::bf16, float> expand_kernel(lk::bf16*, float*) { return lk_expand_bf16_f32; }

struct DeviceRun {
  cudaStream_t stream;
  template <class T, class Tin>
  lk_status operator()(const lk::ExpandParams<T, Tin>& p, lk::Grid3 g) const {
    const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), 1);
    expand_kernel(static_cast<T*>(nullptr), static_cast<Tin*>(nullptr))
        <<<grid, lk::ExpandCfg<T>::THREADS, 0, stream>>>(p);
    return lk::check_cuda(cudaGetLastError(), "lk_sgmv_expand: kernel launch failed");
  }
};

}  // namespace

extern "C" lk_status lk_sgmv_expand(lk_dtype dtype, lk_dtype y_in_dtype, const void* y_in,
                                    int64_t ldyi, void* y_out, int64_t ldyo, const float* t,
                                    int64_t ldt, const void* lora_bt, int64_t ldb,
                                    const int32_t* slot_start, const int32_t* slot_rank,
                                    const float* slot_scale, const int32_t* row_ptr,
                                    const int32_t* entry_ptr, const int32_t* entry_slot,
                                    const float* entry_weight, int64_t num_samples,
                                    int64_t num_slots, int64_t bank_rows, int64_t N,
                                    int64_t max_rows, int64_t max_entries, int64_t max_rank,
                                    void* stream) {
  const lk::ExpandArgs a{y_in,       ldyi,      y_out,       ldyo,       t,
                         ldt,        lora_bt,   ldb,         slot_start, slot_rank,
                         slot_scale, row_ptr,   entry_ptr,   entry_slot, entry_weight,
                         num_samples, num_slots, bank_rows,  N,          max_rows,
                         max_entries, max_rank};
  return lk::expand_api(DeviceRun{static_cast<cudaStream_t>(stream)}, dtype, y_in_dtype, a);
}
