// The one error-checking macro of the CUDA forward: every runtime call and, through
// cudaGetLastError(), every launch is checked, and a failure becomes an absl::Status that names
// the call and the place. Nothing here aborts.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mmdit {

inline absl::Status CudaErrorToStatus(cudaError_t error, const char* what, const char* file,
                                      int line) {
  return absl::InternalError(absl::StrCat("CUDA error ", cudaGetErrorName(error), " (",
                                          cudaGetErrorString(error), ") in ", what, " at ", file,
                                          ":", line));
}

}  // namespace mmdit

#define CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                               \
    const cudaError_t mmdit_cuda_error_ = (expr);                                    \
    if (mmdit_cuda_error_ != cudaSuccess) {                                          \
      return ::mmdit::CudaErrorToStatus(mmdit_cuda_error_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)

namespace mmdit {

// Raises the dynamic shared-memory limit of the kernel `func` to `bytes`, once per device
// (`done` holds one bit per device, a static of the caller's).
inline absl::Status AllowDynamicSmem(const void* func, size_t bytes,
                                     std::atomic<uint64_t>& done) {
  int device = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (done.load(std::memory_order_acquire) & bit) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)));
  done.fetch_or(bit, std::memory_order_acq_rel);
  return absl::OkStatus();
}

}  // namespace mmdit
