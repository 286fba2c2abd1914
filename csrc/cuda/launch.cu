// Library-wide entry points: version, build archs, error messages, device checks.
#include <stdarg.h>
#include <stdio.h>

#include "launch.h"

#ifndef LK_BUILD_ARCHS
#define LK_BUILD_ARCHS "unknown"
#endif

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

lk_status check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return LK_OK;
  return fail(LK_CUDA_ERROR, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

void clear_error() { g_error[0] = '\0'; }

}  // namespace lk

// Compiled for the same architectures as the SGMV kernels: cudaFuncGetAttributes on it tells
// whether this build has an image for a device, before any real launch.
extern "C" __global__ void lk_probe_kernel() {}

extern "C" {

int lk_abi_version(void) { return LK_ABI_VERSION; }

const char* lk_build_archs(void) { return LK_BUILD_ARCHS; }

const char* lk_last_error(void) { return lk::g_error; }

lk_status lk_device_count(int* count) {
  lk::clear_error();
  if (count == nullptr) return lk::fail(LK_INVALID_ARGUMENT, "lk_device_count: count is NULL");
  *count = 0;
  return lk::check_cuda(cudaGetDeviceCount(count), "lk_device_count: cudaGetDeviceCount failed");
}

lk_status lk_check_device(int device) {
  lk::clear_error();
  int current = 0;
  lk_status st = lk::check_cuda(cudaGetDevice(&current), "lk_check_device: no usable CUDA device");
  if (st != LK_OK) return st;
  st = lk::check_cuda(cudaSetDevice(device), "lk_check_device: cannot select the device");
  if (st != LK_OK) return st;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, lk_probe_kernel);
  cudaSetDevice(current);
  if (err != cudaSuccess) {
    return lk::fail(LK_CUDA_ERROR,
                    "lk_check_device: this build (compute capabilities %s) has no kernel image "
                    "for device %d: "
                    "%s (%s)",
                    LK_BUILD_ARCHS, device, cudaGetErrorString(err), cudaGetErrorName(err));
  }
  return LK_OK;
}

}  // extern "C"
