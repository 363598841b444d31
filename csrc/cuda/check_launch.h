// The status check every CUDA binding runs after launching a kernel (host-only, torch-facing: bindings include it,
// kernels never do).
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace sloth::cuda {

// Raises with the op's name when a launch failed (a missing architecture says how to rebuild).
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "sloth.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err),
              ". If this says 'no kernel image is available', this build does not carry your GPU's "
              "architecture: see `sloth info` and rebuild with SLOTH_CUDA_ARCHS set to include it.");
}

}  // namespace sloth::cuda
