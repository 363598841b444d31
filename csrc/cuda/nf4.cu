// CUDA kernels for NF4 dequantize / quantize and blockwise 8-bit quantize (bitsandbytes layout).
#include <algorithm>

#include "launchers.h"
#include "sloth/nf4.h"
#include "sloth/numeric.h"
#include "sloth/vec.cuh"

namespace sloth::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float read_absmax(const Nf4Absmax& a, int64_t b) {
  if (a.absmax) return __ldg(a.absmax + b);
  return add_rn(mul_rn(__ldg(a.code2 + __ldg(a.absmax_q + b)), __ldg(a.absmax2 + (b >> a.log2_blocksize2))), __ldg(a.offset));
}

// out[i] = NF4[q_i] * absmax[i / blocksize] for 8 elements per packed 32-bit word, kWordsPerThread words per
// thread, kThreads apart (4-byte loads, stores coalesced across the warp). Traffic: n/2 packed bytes + one absmax
// lookup per word (L1-cached: 8 words share a 64-block) in, n * sizeof(out) bytes out. Every global load is
// issued before the one barrier (which only guards the 16-entry table). Two words per thread measured best on an
// H100 (benchmarks/NOTES.md).
constexpr int kWordsPerThread = 2;

template <OutType T>
__global__ void __launch_bounds__(kThreads) nf4_dequantize_vec_kernel(const uint32_t* __restrict__ packed,
                                                                      Nf4Absmax absmax, int64_t n_words,
                                                                      int log2_blocksize,
                                                                      typename OutStorage<T>::type* __restrict__ out) {
  __shared__ float lut[16];
  const int64_t cta0 = (int64_t)blockIdx.x * (kThreads * kWordsPerThread);
  auto word_of = [&](int k) -> int64_t { return cta0 + k * kThreads + threadIdx.x; };
  uint32_t w[kWordsPerThread];
  float a[kWordsPerThread];
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) w[k] = word_of(k) < n_words ? __ldg(packed + word_of(k)) : 0u;
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k)
    a[k] = word_of(k) < n_words ? read_absmax(absmax, (word_of(k) * 8) >> log2_blocksize) : 0.0f;
  if (threadIdx.x < 16) lut[threadIdx.x] = nf4_value(threadIdx.x);
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) {
    const int64_t word = word_of(k);
    if (word >= n_words) break;
    float v[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // byte b holds elements 2b (high nibble) and 2b + 1 (low nibble)
      const uint32_t byte = (w[k] >> (8 * b)) & 0xffu;
      v[2 * b] = mul_rn(lut[byte >> 4], a[k]);
      v[2 * b + 1] = mul_rn(lut[byte & 0xfu], a[k]);
    }
    store8<T>(out + word * 8, v);
  }
}

// Element-wise fallback for the tail (n % 8) and for packed data that is not 4-byte aligned.
template <OutType T>
__global__ void nf4_dequantize_scalar_kernel(const uint8_t* __restrict__ packed, Nf4Absmax absmax, int64_t start,
                                             int64_t n, int log2_blocksize,
                                             typename OutStorage<T>::type* __restrict__ out) {
  const int64_t i = start + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint8_t byte = packed[i >> 1];
  const uint8_t q = (i & 1) ? (byte & 0xf) : (byte >> 4);
  out[i] = from_float<T>(mul_rn(nf4_value(q), read_absmax(absmax, i >> log2_blocksize)));
}

// Max over the warp, NaN-propagating (max_nan): a block holding a NaN gets a NaN absmax.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = max_nan(v, shfl_xor(v, m));
  return v;
}

// One warp per quantization block: absmax = max |x|, then each element pair is NF4-encoded against
// x * (1 / absmax) into one byte. Traffic: reads n * sizeof(x), writes n / 2 + 4 * blocks bytes.
template <OutType T>
__global__ void nf4_quantize_kernel(const typename OutStorage<T>::type* __restrict__ x, int64_t n, int blocksize,
                                    int64_t blocks, uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  const int64_t b = (int64_t)blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (b >= blocks) return;
  const int64_t start = b * blocksize, end = min(n, start + blocksize);
  float amax = 0.0f;
  for (int64_t i = start + lane; i < end; i += kWarpSize) amax = max_nan(amax, fabsf(to_float<T>(x[i])));
  amax = warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  const float inv = 1.0f / fmaxf(amax, kMinAbsmax);
  for (int64_t i = start + 2 * lane; i < end; i += 2 * kWarpSize) {
    const uint8_t hi = nf4_encode(mul_rn(to_float<T>(x[i]), inv));
    const uint8_t lo = i + 1 < end ? nf4_encode(mul_rn(to_float<T>(x[i + 1]), inv)) : nf4_encode(0.0f);
    packed[i >> 1] = (uint8_t)((hi << 4) | lo);
  }
}

// One warp per block: absmax, then the nearest entry of the sorted 256-entry code (in shared memory).
template <OutType T>
__global__ void blockwise8_quantize_kernel(const typename OutStorage<T>::type* __restrict__ x, int64_t n,
                                           const float* __restrict__ code, int blocksize, int64_t blocks,
                                           uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code[i];
  __syncthreads();
  const int64_t b = (int64_t)blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (b >= blocks) return;
  const int64_t start = b * blocksize, end = min(n, start + blocksize);
  float amax = 0.0f;
  for (int64_t i = start + lane; i < end; i += kWarpSize) amax = max_nan(amax, fabsf(to_float<T>(x[i])));
  amax = warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  const float inv = 1.0f / fmaxf(amax, kMinAbsmax);
  for (int64_t i = start + lane; i < end; i += kWarpSize) q[i] = code256_encode(s_code, mul_rn(to_float<T>(x[i]), inv));
}

int log2i(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

}  // namespace

cudaError_t launch_nf4_dequantize(const uint8_t* packed, Nf4Absmax absmax, int64_t n, int blocksize, void* out,
                           OutType out_type, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int lb = log2i(blocksize);
  dispatch_out_type(out_type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    raw* o = static_cast<raw*>(out);
    const bool aligned = (reinterpret_cast<uintptr_t>(packed) % 4 == 0) && (reinterpret_cast<uintptr_t>(o) % 16 == 0);
    const int64_t n_words = aligned ? n / 8 : 0;
    if (n_words > 0) {
      const int64_t grid = (n_words + kThreads * kWordsPerThread - 1) / (kThreads * kWordsPerThread);
      nf4_dequantize_vec_kernel<T><<<(unsigned)grid, kThreads, 0, stream>>>(
          reinterpret_cast<const uint32_t*>(packed), absmax, n_words, lb, o);
    }
    const int64_t rest = n - n_words * 8;
    if (rest > 0)
      nf4_dequantize_scalar_kernel<T><<<(unsigned)((rest + 255) / 256), 256, 0, stream>>>(packed, absmax, n_words * 8,
                                                                                         n, lb, o);
  });
  return cudaGetLastError();
}

cudaError_t launch_nf4_quantize(const void* x, OutType in_type, int64_t n, int blocksize, uint8_t* packed, float* absmax,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int warps = kThreads / kWarpSize;
  dispatch_out_type(in_type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    nf4_quantize_kernel<T><<<(unsigned)((blocks + warps - 1) / warps), kThreads, 0, stream>>>(
        static_cast<const typename OutStorage<T>::type*>(x), n, blocksize, blocks, packed, absmax);
  });
  return cudaGetLastError();
}

cudaError_t launch_blockwise8_quantize(const void* x, OutType in_type, int64_t n, const float* code, int blocksize,
                                uint8_t* q, float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int warps = kThreads / kWarpSize;
  dispatch_out_type(in_type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    blockwise8_quantize_kernel<T><<<(unsigned)((blocks + warps - 1) / warps), kThreads, 0, stream>>>(
        static_cast<const typename OutStorage<T>::type*>(x), n, code, blocksize, blocks, q, absmax);
  });
  return cudaGetLastError();
}

}  // namespace sloth::cuda
