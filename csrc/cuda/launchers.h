// Host-side launchers of the CUDA kernels: raw pointers and a stream, no torch types.
// The torch bindings (bindings.cpp) validate arguments and call these.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "sloth/numeric.h"

namespace sloth::cuda {

// NF4 absmax: fp32 `absmax`, or (double quantization) uint8 `absmax_q` with fp32 `code2[256]`,
// `absmax2[ceil(blocks / blocksize2)]` and `offset[1]`.
struct Nf4Absmax {
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* code2 = nullptr;
  const float* absmax2 = nullptr;
  const float* offset = nullptr;
  int blocksize2 = 256;
};

cudaError_t nf4_dequantize(const uint8_t* packed, Nf4Absmax absmax, int64_t n, int blocksize, void* out,
                           OutType out_type, cudaStream_t stream);
cudaError_t nf4_quantize(const void* x, OutType in_type, int64_t n, int blocksize, uint8_t* packed,
                         float* absmax, cudaStream_t stream);
cudaError_t blockwise8_quantize(const void* x, OutType in_type, int64_t n, const float* code, int blocksize,
                                uint8_t* q, float* absmax, cudaStream_t stream);
cudaError_t mxfp4_dequantize(const uint8_t* blocks, const uint8_t* scales, int64_t rows, void* out,
                             OutType out_type, cudaStream_t stream);
cudaError_t mxfp4_quantize(const void* x, OutType in_type, int64_t rows, uint8_t* blocks, uint8_t* scales,
                           cudaStream_t stream);

}  // namespace sloth::cuda

// ---- chunked linear cross-entropy (branch ce): cross_entropy.cu ----
namespace sloth::cuda {

// Per-row arguments of one chunk of logits.
struct CeChunkArgs {
  const int64_t* labels = nullptr;        // [rows]
  const float* grad_nll = nullptr;        // [rows] or null (= 1)
  const float* grad_entropy = nullptr;    // [rows] or null (= 0)
  float grad_scale = 1.0f, softcap = 0.0f, logit_scale = 1.0f;
  int64_t ignore_index = -100;
  bool compute_grad = false;
  float* loss = nullptr;                  // [rows] out
  float* lse = nullptr;                   // [rows] out
  float* entropy = nullptr;               // [rows] out
};

// logits: [rows, V] contiguous of `type`, overwritten in place by the gradient when args.compute_grad.
cudaError_t cross_entropy_chunk(void* logits, OutType type, int64_t rows, int64_t V, CeChunkArgs args,
                                cudaStream_t stream);

}  // namespace sloth::cuda
