// The C ABI of csrc/include/lorakernels.h implemented by the host emulation (emulate.h):
// same argument checks (sgmv_api.h), same kernel bodies, no GPU. Built as
// liblorakernels_emulated.so for the tests, which load it in place of the CUDA library to run
// lorakernels/kernels/cuda.py's ctypes calls end to end on CPU tensors. Not for production:
// it is slow and single-threaded.
#include <stdarg.h>

#include "emulate.h"

namespace lk {

namespace {
thread_local char g_error[1024] = "";
}  // namespace

lk_status fail(lk_status status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, args);
  va_end(args);
  return status;
}

void clear_error() { g_error[0] = '\0'; }

}  // namespace lk

extern "C" {

int lk_abi_version(void) { return LK_ABI_VERSION; }

const char* lk_build_archs(void) { return "host-emulation"; }

const char* lk_last_error(void) { return lk::g_error; }

lk_status lk_device_count(int* count) {
  lk::clear_error();
  if (count == nullptr) return lk::fail(LK_INVALID_ARGUMENT, "lk_device_count: count is NULL");
  *count = 1;  // the host itself
  return LK_OK;
}

lk_status lk_check_device(int device) {
  lk::clear_error();
  return device == 0 ? LK_OK : lk::fail(LK_INVALID_ARGUMENT, "emulation has only device 0");
}

lk_status lk_sgmv_shrink(lk_dtype dtype, const void* x, int64_t ldx, const void* lora_a,
                         int64_t lda, float* t, int64_t ldt, const int32_t* slot_start,
                         const int32_t* slot_rank, const int32_t* row_ptr,
                         const int32_t* entry_ptr, const int32_t* entry_slot,
                         int64_t num_samples, int64_t num_slots, int64_t bank_rows, int64_t K,
                         int64_t max_rows, int64_t max_entries, int64_t max_rank, void*) {
  return lk::shrink_api(lk_emu::HostRun{}, dtype, x, ldx, lora_a, lda, t, ldt, slot_start,
                        slot_rank, row_ptr, entry_ptr, entry_slot, num_samples, num_slots,
                        bank_rows, K, max_rows, max_entries, max_rank);
}

lk_status lk_sgmv_expand(lk_dtype dtype, lk_dtype y_in_dtype, const void* y_in, int64_t ldyi,
                         void* y_out, int64_t ldyo, const float* t, int64_t ldt,
                         const void* lora_bt, int64_t ldb, const int32_t* slot_start,
                         const int32_t* slot_rank, const float* slot_scale,
                         const int32_t* row_ptr, const int32_t* entry_ptr,
                         const int32_t* entry_slot, const float* entry_weight,
                         int64_t num_samples, int64_t num_slots, int64_t bank_rows, int64_t N,
                         int64_t max_rows, int64_t max_entries, int64_t max_rank, void*) {
  const lk::ExpandArgs a{y_in,       ldyi,      y_out,       ldyo,       t,
                         ldt,        lora_bt,   ldb,         slot_start, slot_rank,
                         slot_scale, row_ptr,   entry_ptr,   entry_slot, entry_weight,
                         num_samples, num_slots, bank_rows,  N,          max_rows,
                         max_entries, max_rank};
  return lk::expand_api(lk_emu::HostRun{}, dtype, y_in_dtype, a);
}

}  // extern "C"
