// Bit-level float conversions shared by host and device (round to nearest even).
//
// Kernels store 16-bit outputs as raw uint16_t so that one code path serves CPU, CUDA
// and HIP (whose bf16 headers differ across ROCm versions) and rounds exactly as
// PyTorch's .to(bfloat16) / .to(float16) do.
#pragma once
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "sloth/portability.h"

namespace sloth {

SLOTH_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

SLOTH_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// fp32 -> bf16 bits, round to nearest even; NaN stays a quiet NaN.
SLOTH_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

SLOTH_HD float bf16_bits_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

// fp32 -> IEEE fp16 bits, round to nearest even, with subnormals, overflow to inf, NaN kept.
SLOTH_HD uint16_t float_to_fp16_bits(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);                 // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                                  // normal fp16
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;             // rebias 127 -> 15
    return (uint16_t)(sign | (r >> 13));
  }
  if (a < 0x33000000u) return sign;                                       // < 2^-25 rounds to 0
  // subnormal fp16: value = m * 2^-24
  uint32_t e = a >> 23;                                                    // 102..112
  uint32_t m = (a & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126u - e;                                               // 14..24
  uint32_t q = m >> shift;
  uint32_t rem = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) q += 1u;
  return (uint16_t)(sign | q);
}

SLOTH_HD float fp16_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return bits_float(sign);
    float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// max(a, b) that propagates NaN (fmaxf drops it): the absmax of a block holding a NaN is NaN, so the block
// dequantizes to NaN (bitsandbytes' behaviour) instead of to numbers.
SLOTH_HD float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// Output element types, selected at runtime by a dtype code shared with the bindings.
enum class OutType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

template <OutType T> struct OutStorage;
template <> struct OutStorage<OutType::kF32> { using type = float; };
template <> struct OutStorage<OutType::kF16> { using type = uint16_t; };
template <> struct OutStorage<OutType::kBF16> { using type = uint16_t; };

template <OutType T>
SLOTH_HD typename OutStorage<T>::type from_float(float v) {
  if constexpr (T == OutType::kF32) return v;
  else if constexpr (T == OutType::kF16) return float_to_fp16_bits(v);
  else return float_to_bf16_bits(v);
}

template <OutType T>
SLOTH_HD float to_float(typename OutStorage<T>::type v) {
  if constexpr (T == OutType::kF32) return v;
  else if constexpr (T == OutType::kF16) return fp16_bits_to_float(v);
  else return bf16_bits_to_float(v);
}

// Calls fn(std::integral_constant<OutType, T>{}) for the runtime type t.
template <typename Fn>
void dispatch_out_type(OutType t, Fn&& fn) {
  switch (t) {
    case OutType::kF32: fn(std::integral_constant<OutType, OutType::kF32>{}); break;
    case OutType::kF16: fn(std::integral_constant<OutType, OutType::kF16>{}); break;
    case OutType::kBF16: fn(std::integral_constant<OutType, OutType::kBF16>{}); break;
  }
}

}  // namespace sloth
