// MXFP4 (OCP Microscaling FP4) math, as gpt-oss checkpoints store it.
//
// Each block of 32 consecutive elements shares one E8M0 scale byte s (value 2^(s - 127));
// elements are E2M1 (1 sign, 2 exponent, 1 mantissa bits), two per byte with element 2j in
// the LOW nibble and 2j+1 in the HIGH nibble. Transformers reads `<name>_blocks`
// [..., G, 16] uint8 and `<name>_scales` [..., G] uint8.
#pragma once
#include <stdint.h>

#include "sloth/numeric.h"
#include "sloth/portability.h"

#define SLOTH_E2M1_VALUES                                                              \
  {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,                                      \
   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f}

namespace sloth {

constexpr int kMxBlock = 32;

// 2^(s - 127) as fp32 for s <= 254 (s = 0 gives the subnormal 2^-127).
SLOTH_HD float e8m0_to_float(uint8_t s) {
  if (s == 0) return bits_float(0x00400000u);
  return bits_float((uint32_t)(s > 254 ? 254 : s) << 23);
}

// v * 2^(s - 127) exactly as Transformers' torch.ldexp for s <= 254; s = 255 is the E8M0 NaN (OCP MX): NaN
// (mxfp4_quantize writes it for a block holding a NaN; checkpoints do not use it). `scale` is e8m0_to_float(s).
SLOTH_HD float mx_scale_value(float v, float scale, uint8_t s) {
  return s == 255 ? bits_float(0x7fc00000u) : mul_rn(v, scale);
}

// 1 / 2^(s - 127) = 2^(127 - s), exact, for the finite scales mx_scale_for produces (s <= 254; 255 gives 1).
SLOTH_HD float e8m0_inverse(uint8_t s) { return s == 255 ? 1.0f : e8m0_to_float((uint8_t)(254 - s)); }

// E2M1 code of x (already divided by the block scale): round to nearest, ties to even
// mantissa, saturating at +-6; NaN encodes as +0.
SLOTH_HD uint8_t e2m1_encode(float x) {
  uint8_t sign = float_bits(x) >> 31 ? 8 : 0;
  float a = x < 0.0f ? -x : x;
  uint8_t m;
  if (!(a > 0.25f)) m = 0;         // [0, 0.25] -> 0 (0.25 ties to even 0); NaN -> 0
  else if (a < 0.75f) m = 1;       // 0.5
  else if (a <= 1.25f) m = 2;      // 1.0  (1.25 ties to even 1.0)
  else if (a < 1.75f) m = 3;       // 1.5
  else if (a <= 2.5f) m = 4;       // 2.0  (2.5 ties to even 2.0)
  else if (a < 3.5f) m = 5;        // 3.0
  else if (a <= 5.0f) m = 6;       // 4.0  (5.0 ties to even 4.0)
  else m = 7;                      // 6.0, saturating
  return (uint8_t)(sign | m);
}

// Shared E8M0 scale for a block with max |x| = amax: 2^(floor(log2 amax) - 2), the OCP
// rule (emax of E2M1 is 2), clamped to the representable exponents; amax = 0 gives 2^-127, NaN (a block holding
// a NaN, see max_nan) the E8M0 NaN 255.
SLOTH_HD uint8_t mx_scale_for(float amax) {
  uint32_t bits = float_bits(amax);
  int e = (int)((bits >> 23) & 0xffu);        // biased exponent; 0 for zero / subnormal
  if (e == 0) return 0;
  if (e == 255) return (bits & 0x7fffffu) ? 255 : 254;  // NaN: the NaN scale; inf: the largest finite one
  int s = e - 2;                              // biased (floor(log2 amax) - 2)
  return (uint8_t)(s < 0 ? 0 : (s > 254 ? 254 : s));
}

}  // namespace sloth
