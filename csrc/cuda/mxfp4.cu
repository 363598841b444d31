// CUDA kernels for MXFP4 dequantize / quantize (OCP MX E2M1 + E8M0 per 32, gpt-oss layout).
#include "launchers.h"
#include "sloth/mxfp4.h"
#include "sloth/numeric.h"
#include "sloth/vec.cuh"

namespace sloth::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWordsPerThread = 4;

// out[r, j] = E2M1[nibble j of row r] * 2^(scales[r] - 127); a row is one 32-element block (16 bytes).
// Traffic: 17 bytes in, 32 * sizeof(out) bytes out per row; 4-byte loads and 16-byte stores, coalesced.
template <OutType T>
__global__ void __launch_bounds__(kThreads) mxfp4_dequantize_kernel(const uint32_t* __restrict__ blocks,
                                                                    const uint8_t* __restrict__ scales,
                                                                    int64_t n_words,
                                                                    typename OutStorage<T>::type* __restrict__ out) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) {
    constexpr float kE2M1[16] = SLOTH_E2M1_VALUES;
    lut[threadIdx.x] = kE2M1[threadIdx.x];
  }
  const int64_t word0 = (int64_t)blockIdx.x * (kThreads * kWordsPerThread);
  uint32_t w[kWordsPerThread];
  uint8_t s[kWordsPerThread];
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) {
    const int64_t word = word0 + k * kThreads + threadIdx.x;
    w[k] = word < n_words ? __ldg(blocks + word) : 0u;
    s[k] = word < n_words ? __ldg(scales + (word >> 2)) : 0;  // 4 words per row
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) {
    const int64_t word = word0 + k * kThreads + threadIdx.x;
    if (word >= n_words) break;
    const float scale = e8m0_to_float(s[k]);
    float v[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // byte b holds elements 2b (low nibble) and 2b + 1 (high nibble)
      const uint32_t byte = (w[k] >> (8 * b)) & 0xffu;
      v[2 * b] = mx_scale_value(lut[byte & 0xfu], scale, s[k]);
      v[2 * b + 1] = mx_scale_value(lut[byte >> 4], scale, s[k]);
    }
    store8<T>(out + word * 8, v);
  }
}

// One thread per 32-element row: E8M0 scale from the row's absmax, then E2M1 round-to-nearest-even.
template <OutType T>
__global__ void mxfp4_quantize_kernel(const typename OutStorage<T>::type* __restrict__ x, int64_t rows,
                                      uint8_t* __restrict__ blocks, uint8_t* __restrict__ scales) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const auto* v = x + r * kMxBlock;
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kMxBlock; ++i) amax = max_nan(amax, fabsf(to_float<T>(v[i])));  // NaN: scale 255
  const uint8_t s = mx_scale_for(amax);
  scales[r] = s;
  const float inv = e8m0_inverse(s);
#pragma unroll
  for (int j = 0; j < kMxBlock / 2; ++j) {
    const uint8_t lo = e2m1_encode(mul_rn(to_float<T>(v[2 * j]), inv));
    const uint8_t hi = e2m1_encode(mul_rn(to_float<T>(v[2 * j + 1]), inv));
    blocks[r * (kMxBlock / 2) + j] = (uint8_t)(lo | (hi << 4));
  }
}

}  // namespace

cudaError_t launch_mxfp4_dequantize(const uint8_t* blocks, const uint8_t* scales, int64_t rows, void* out,
                             OutType out_type, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t n_words = rows * 4;
  const int64_t grid = (n_words + kThreads * kWordsPerThread - 1) / (kThreads * kWordsPerThread);
  dispatch_out_type(out_type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    mxfp4_dequantize_kernel<T><<<(unsigned)grid, kThreads, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(blocks), scales, n_words, static_cast<typename OutStorage<T>::type*>(out));
  });
  return cudaGetLastError();
}

cudaError_t launch_mxfp4_quantize(const void* x, OutType in_type, int64_t rows, uint8_t* blocks, uint8_t* scales,
                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  dispatch_out_type(in_type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    mxfp4_quantize_kernel<T><<<(unsigned)((rows + 127) / 128), 128, 0, stream>>>(
        static_cast<const typename OutStorage<T>::type*>(x), rows, blocks, scales);
  });
  return cudaGetLastError();
}

}  // namespace sloth::cuda
