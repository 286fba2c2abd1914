/*
 * lorakernels native CUDA library: C ABI.
 *
 * The library links no torch: every entry point takes raw device pointers, element strides,
 * sizes, dtype enums and a cudaStream_t (passed as void*), and returns an lk_status. A
 * non-zero status comes with a sentence from lk_last_error() (thread-local, valid until the
 * next call on the same thread). Python calls these through ctypes
 * (lorakernels/kernels/cuda.py); see that module for the tensor-level semantics.
 *
 * Semantics (S samples, segment s owns rows row_ptr[s] .. row_ptr[s+1] and mixture entries
 * entry_ptr[s] .. entry_ptr[s+1]; entry e uses slot l = entry_slot[e] whose adapter rows are
 * bank rows slot_start[l] .. slot_start[l] + slot_rank[l]):
 *
 *   shrink: t[m, j*max_rank + c] = sum_k x[m, k] * lora_a[slot_start[l] + c, k]     (fp32)
 *           for the j-th entry of m's sample and c < slot_rank[l]; other columns untouched.
 *   expand: y_out[m, n] = y_in[m, n] + sum_j entry_weight[e] * slot_scale[l]
 *                                          * sum_c t[m, j*max_rank + c] * lora_bt[start + c, n]
 *           written for every row covered by row_ptr, rounded once to the output dtype.
 *
 * Capacities (max_rows, max_entries, max_rank) are host-side upper bounds that size the grid,
 * so a launch is CUDA-graph safe. Entries past max_entries, ranks past max_rank, slots out of
 * [0, num_slots) and adapters overrunning bank_rows are skipped, never read out of bounds;
 * rows past max_rows in one sample are not computed (the caller guarantees the bounds).
 * Innermost strides are 1 (x, lora_a, lora_bt, t, y_in, y_out); leading strides are given.
 */
#ifndef LORAKERNELS_H_
#define LORAKERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LK_ABI_VERSION 1

/* The library is built with hidden visibility; only these entry points are exported. */
#if defined(__GNUC__)
#define LK_API __attribute__((visibility("default")))
#else
#define LK_API
#endif

typedef enum lk_dtype { LK_FLOAT32 = 0, LK_FLOAT16 = 1, LK_BFLOAT16 = 2 } lk_dtype;

typedef enum lk_status {
  LK_OK = 0,
  LK_INVALID_ARGUMENT = 1, /* a size, stride, dtype or pointer is unusable */
  LK_CUDA_ERROR = 2,       /* the CUDA runtime refused (no driver, no device, no kernel image) */
} lk_status;

/* ABI version of the loaded library (LK_ABI_VERSION when it matches this header). */
LK_API int lk_abi_version(void);

/* Comma-separated SM architectures the device code was compiled for, e.g. "80,90". */
LK_API const char* lk_build_archs(void);

/* The last error message on this thread ("" after a successful call). */
LK_API const char* lk_last_error(void);

/* Number of visible CUDA devices in *count; a CUDA error (e.g. no driver) as a status. */
LK_API lk_status lk_device_count(int* count);

/* LK_OK when the kernels have an image that runs on the given device. */
LK_API lk_status lk_check_device(int device);

LK_API lk_status lk_sgmv_shrink(lk_dtype dtype, const void* x, int64_t ldx, const void* lora_a,
                         int64_t lda, float* t, int64_t ldt, const int32_t* slot_start,
                         const int32_t* slot_rank, const int32_t* row_ptr,
                         const int32_t* entry_ptr, const int32_t* entry_slot,
                         int64_t num_samples, int64_t num_slots, int64_t bank_rows, int64_t K,
                         int64_t max_rows, int64_t max_entries, int64_t max_rank, void* stream);

/* y_in_dtype is dtype or LK_FLOAT32; y_out is of dtype; y_in == y_out (in place) is allowed
 * when they have the same dtype and leading stride. */
LK_API lk_status lk_sgmv_expand(lk_dtype dtype, lk_dtype y_in_dtype, const void* y_in, int64_t ldyi,
                         void* y_out, int64_t ldyo, const float* t, int64_t ldt,
                         const void* lora_bt, int64_t ldb, const int32_t* slot_start,
                         const int32_t* slot_rank, const float* slot_scale,
                         const int32_t* row_ptr, const int32_t* entry_ptr,
                         const int32_t* entry_slot, const float* entry_weight,
                         int64_t num_samples, int64_t num_slots, int64_t bank_rows, int64_t N,
                         int64_t max_rows, int64_t max_entries, int64_t max_rank, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LORAKERNELS_H_ */
