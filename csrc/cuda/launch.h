// Internal helpers of the GPU launchers: CUDA error mapping (the rest is in sgmv_api.h).
#pragma once

#include <cuda_runtime.h>

#include "sgmv_api.h"

namespace lk {

// LK_OK, or LK_CUDA_ERROR with "<what>: <CUDA message> (<error name>)".
lk_status check_cuda(cudaError_t err, const char* what);

}  // namespace lk
