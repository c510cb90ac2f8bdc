// The one error-checking macro of the CUDA forward: every runtime call and, through
// cudaGetLastError(), every launch is checked, and a failure becomes an absl::Status that names
// the call and the place. Nothing here aborts.
#pragma once

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
