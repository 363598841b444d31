// Packs 8 converted outputs into 16-byte stores (one for 16-bit types, two for fp32).
#pragma once
#include <stdint.h>

#include "sloth/numeric.h"

namespace sloth::cuda {

template <OutType T>
__device__ __forceinline__ void store8(typename OutStorage<T>::type* dst, const float (&v)[8]) {
  if constexpr (T == OutType::kF32) {
    uint4* d = reinterpret_cast<uint4*>(dst);
    d[0] = make_uint4(float_bits(v[0]), float_bits(v[1]), float_bits(v[2]), float_bits(v[3]));
    d[1] = make_uint4(float_bits(v[4]), float_bits(v[5]), float_bits(v[6]), float_bits(v[7]));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = (uint32_t)from_float<T>(v[2 * i]) | ((uint32_t)from_float<T>(v[2 * i + 1]) << 16);
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

}  // namespace sloth::cuda
