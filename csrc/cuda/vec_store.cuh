// Packs 8 converted outputs into 16-byte stores (one for 16-bit types, two for fp32).
#pragma once
#include <stdint.h>

#include "sloth/numeric.h"

namespace sloth::cuda {

// Two floats -> two 16-bit values (lo in the low half), round to nearest even. On NVIDIA sm_80+ one
// cvt instruction does the pair; elsewhere the portable bit arithmetic of numeric.h (same results for
// all non-NaN inputs; NaN becomes the canonical NaN in hardware).
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

template <OutType T, bool kStreaming = false>
__device__ __forceinline__ void store8(typename OutStorage<T>::type* dst, const float (&v)[8]) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  if constexpr (T == OutType::kF32) {
    store16<kStreaming>(d, make_uint4(float_bits(v[0]), float_bits(v[1]), float_bits(v[2]), float_bits(v[3])));
    store16<kStreaming>(d + 1, make_uint4(float_bits(v[4]), float_bits(v[5]), float_bits(v[6]), float_bits(v[7])));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = pack2<T>(v[2 * i], v[2 * i + 1]);
    store16<kStreaming>(d, make_uint4(w[0], w[1], w[2], w[3]));
  }
}

}  // namespace sloth::cuda
