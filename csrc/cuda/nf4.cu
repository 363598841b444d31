// CUDA kernels for NF4 dequantize / quantize and blockwise 8-bit quantize (bitsandbytes layout).
#include <stdlib.h>

#include <algorithm>

#include "launchers.h"
#include "sloth/nf4.h"
#include "sloth/numeric.h"
#include "vec_store.cuh"

namespace sloth::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float read_absmax(const Nf4Absmax& a, int64_t b) {
  if (a.absmax) return __ldg(a.absmax + b);
  return add_rn(mul_rn(__ldg(a.code2 + __ldg(a.absmax_q + b)), __ldg(a.absmax2 + (b >> a.log2_blocksize2))), __ldg(a.offset));
}

// out[i] = NF4[q_i] * absmax[i / blocksize] for 8 elements per packed 32-bit word, kWordsPerThread words per
// thread. Traffic: n/2 packed bytes + one absmax lookup per word (L1-cached: 8 words share a 64-block) in,
// n * sizeof(out) bytes out. kContiguous: a thread's words are adjacent (one 16-byte load, 64 contiguous
// output bytes); otherwise they are kThreads apart (4-byte loads, stores coalesced across the warp). Every
// global load is issued before the one barrier (which only guards the 16-entry table).
template <OutType T, int kWordsPerThread, bool kStreaming, bool kContiguous>
__global__ void __launch_bounds__(kThreads) nf4_dequantize_vec_kernel(const uint32_t* __restrict__ packed,
                                                                      Nf4Absmax absmax, int64_t n_words,
                                                                      int log2_blocksize,
                                                                      typename OutStorage<T>::type* __restrict__ out) {
  __shared__ float lut[16];
  const int64_t cta0 = (int64_t)blockIdx.x * (kThreads * kWordsPerThread);
  auto word_of = [&](int k) -> int64_t {
    return kContiguous ? cta0 + (int64_t)threadIdx.x * kWordsPerThread + k : cta0 + k * kThreads + threadIdx.x;
  };
  uint32_t w[kWordsPerThread];
  float a[kWordsPerThread];
  if constexpr (kContiguous && kWordsPerThread == 4) {
    if (word_of(3) < n_words) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(packed + word_of(0)));
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = word_of(k) < n_words ? __ldg(packed + word_of(k)) : 0u;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kWordsPerThread; ++k) w[k] = word_of(k) < n_words ? __ldg(packed + word_of(k)) : 0u;
  }
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
    store8<T, kStreaming>(out + word * 8, v);
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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
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
  for (int64_t i = start + lane; i < end; i += kWarpSize) amax = fmaxf(amax, fabsf(to_float<T>(x[i])));
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
  for (int64_t i = start + lane; i < end; i += kWarpSize) amax = fmaxf(amax, fabsf(to_float<T>(x[i])));
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

cudaError_t nf4_dequantize(const uint8_t* packed, Nf4Absmax absmax, int64_t n, int blocksize, void* out,
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
      // Variant (SLOTH_NF4_DEQUANT_VARIANT, read once; for A/B measurements on other GPUs): words per thread,
      // streaming stores, contiguous words. 0: 4 strided, 1: 8 strided + streaming, 2: 2 strided (default),
      // 3: 4 strided + streaming, 4: 4 contiguous (16-byte loads). H100, [14336, 4096] -> bf16, TB/s of
      // bytes read + written, 20 back-to-back calls (bf16 copy 2.85-2.89, write-only fill 2.99-3.04 in the
      // same runs): 2: 2.56-2.64, 0: 2.54-2.57, 3: 2.57; a persistent grid-stride version of 2 / 4 words
      // per thread: 2.12-2.45 (removed). Single-call timings (launch latency included) had ranked 1 and 4
      // at 1.95 and 1.38.
      static const int variant = getenv("SLOTH_NF4_DEQUANT_VARIANT") ? atoi(getenv("SLOTH_NF4_DEQUANT_VARIANT")) : 2;
      const uint32_t* p = reinterpret_cast<const uint32_t*>(packed);
      auto launch = [&](auto kernel, int words) {
        const int64_t grid = (n_words + kThreads * words - 1) / (kThreads * words);
        kernel<<<(unsigned)grid, kThreads, 0, stream>>>(p, absmax, n_words, lb, o);
      };
      const bool aligned16 = reinterpret_cast<uintptr_t>(packed) % 16 == 0;
      switch (variant) {
        case 1: launch(nf4_dequantize_vec_kernel<T, 8, true, false>, 8); break;
        case 3: launch(nf4_dequantize_vec_kernel<T, 4, true, false>, 4); break;
        case 4:
          if (aligned16) { launch(nf4_dequantize_vec_kernel<T, 4, false, true>, 4); break; }
          [[fallthrough]];
        case 0: launch(nf4_dequantize_vec_kernel<T, 4, false, false>, 4); break;
        default: launch(nf4_dequantize_vec_kernel<T, 2, false, false>, 2);
      }
    }
    const int64_t rest = n - n_words * 8;
    if (rest > 0)
      nf4_dequantize_scalar_kernel<T><<<(unsigned)((rest + 255) / 256), 256, 0, stream>>>(packed, absmax, n_words * 8,
                                                                                         n, lb, o);
  });
  return cudaGetLastError();
}

cudaError_t nf4_quantize(const void* x, OutType in_type, int64_t n, int blocksize, uint8_t* packed, float* absmax,
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

cudaError_t blockwise8_quantize(const void* x, OutType in_type, int64_t n, const float* code, int blocksize,
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
