// Device-side vector helpers shared by the CUDA / HIP kernels: 16-byte words <-> fp32 values, 8-element loads
// and stores, and CTA-wide reductions. (Device code only: included by csrc/cuda/*.cu, never by host sources.)
#pragma once
#include <stdint.h>

#include "sloth/numeric.h"
#include "sloth/portability.h"

namespace sloth {

// Elements of T in one 16-byte word.
template <OutType T>
constexpr int kVec16 = 16 / (int)sizeof(typename OutStorage<T>::type);

// One 16-byte word -> kVec16<T> fp32 values.
template <OutType T>
__device__ __forceinline__ void unpack16(const uint4 w, float (&v)[kVec16<T>]) {
  if constexpr (T == OutType::kF32) {
    v[0] = bits_float(w.x), v[1] = bits_float(w.y), v[2] = bits_float(w.z), v[3] = bits_float(w.w);
  } else {
    const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = to_float<T>((uint16_t)(ws[i] & 0xffffu));
      v[2 * i + 1] = to_float<T>((uint16_t)(ws[i] >> 16));
    }
  }
}

// Two floats -> two 16-bit values (lo in the low half), round to nearest even. On NVIDIA sm_80+ one cvt
// instruction does the pair; elsewhere the portable bit arithmetic of numeric.h (same results for all non-NaN
// inputs; NaN becomes the canonical NaN in hardware).
template <OutType T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(SLOTH_HIP)
  uint32_t r;
  if constexpr (T == OutType::kBF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return (uint32_t)from_float<T>(lo) | ((uint32_t)from_float<T>(hi) << 16);
#endif
}

// kVec16<T> fp32 values -> one 16-byte word.
template <OutType T>
__device__ __forceinline__ uint4 pack16(const float (&v)[kVec16<T>]) {
  if constexpr (T == OutType::kF32) {
    return make_uint4(float_bits(v[0]), float_bits(v[1]), float_bits(v[2]), float_bits(v[3]));
  } else {
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}

// 16-byte store; kStreaming marks it evict-first (st.global.cs): output that no one reads soon.
template <bool kStreaming>
__device__ __forceinline__ void store16(uint4* dst, uint4 v) {
#if !defined(SLOTH_HIP)
  if constexpr (kStreaming) {
    __stcs(dst, v);
    return;
  }
#endif
  *dst = v;
}

// 8 elements of T at a 16-byte aligned `src` (one 16-byte load, two for fp32) -> fp32.
template <OutType T>
__device__ __forceinline__ void load8(const typename OutStorage<T>::type* src, float (&v)[8]) {
  const uint4* q = reinterpret_cast<const uint4*>(src);
  if constexpr (T == OutType::kF32) {
    float a[4], b[4];
    unpack16<T>(q[0], a);
    unpack16<T>(q[1], b);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = a[i], v[4 + i] = b[i];
  } else {
    unpack16<T>(q[0], v);
  }
}

// 8 fp32 values -> 8 elements of T at a 16-byte aligned `dst` (one 16-byte store, two for fp32).
template <OutType T, bool kStreaming = false>
__device__ __forceinline__ void store8(typename OutStorage<T>::type* dst, const float (&v)[8]) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  if constexpr (T == OutType::kF32) {
    store16<kStreaming>(d, make_uint4(float_bits(v[0]), float_bits(v[1]), float_bits(v[2]), float_bits(v[3])));
    store16<kStreaming>(d + 1, make_uint4(float_bits(v[4]), float_bits(v[5]), float_bits(v[6]), float_bits(v[7])));
  } else {
    store16<kStreaming>(d, make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                                      pack2<T>(v[6], v[7])));
  }
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// op-reduction of v over the CTA (blockDim.x threads, whole warps); every thread gets the result, in one
// order for all threads. `red` holds one float per warp; it may be reused by the next call (the leading barrier
// waits for the previous call's readers).
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* red, Op op = Op{}) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < warps; ++i) r = op(r, red[i]);
  return r;
}

}  // namespace sloth
