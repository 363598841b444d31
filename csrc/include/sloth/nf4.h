// NF4 and blockwise 8-bit (dynamic code) math, bit-compatible with bitsandbytes.
//
// Format (bitsandbytes `quant_type="nf4"`): the flattened tensor is cut into blocks of
// `blocksize` elements; absmax[b] = max |x| over block b (fp32); each element is stored as
// the index of the nearest of the 16 NF4 code values to x / absmax, two per byte with
// element 2j in the HIGH nibble and 2j+1 in the LOW nibble. With double quantization
// ("compress_statistics") absmax itself is stored as 8-bit indices into the 256-entry
// signed dynamic code, blocks of 256, plus a fp32 offset:
//     absmax[b] = code2[q[b]] * absmax2[b / 256] + offset
#pragma once
#include <stdint.h>

#include "sloth/portability.h"

// The 16 NF4 values (quantiles of N(0,1) normalized to [-1, 1]), as bitsandbytes defines them.
#define SLOTH_NF4_VALUES                                                               \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,           \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,          \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                   \
   0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                    \
   0.7229568362236023f, 1.0f}

namespace sloth {

// NF4 value of code q (0..15) without a table: a balanced select tree over constants, so GPU code never
// indexes a local array (which would go to local memory).
SLOTH_HD float nf4_value(uint32_t q) {
  if (q & 8) {
    if (q & 4) {
      if (q & 2) return (q & 1) ? 1.0f : 0.7229568362236023f;
      return (q & 1) ? 0.5626170039176941f : 0.44070982933044434f;
    }
    if (q & 2) return (q & 1) ? 0.33791524171829224f : 0.24611230194568634f;
    return (q & 1) ? 0.16093020141124725f : 0.07958029955625534f;
  }
  if (q & 4) {
    if (q & 2) return (q & 1) ? 0.0f : -0.09105003625154495f;
    return (q & 1) ? -0.18477343022823334f : -0.28444138169288635f;
  }
  if (q & 2) return (q & 1) ? -0.39491748809814453f : -0.5250730514526367f;
  return (q & 1) ? -0.6961928009986877f : -1.0f;
}

// Index of the NF4 value nearest to x in [-1, 1]; a value exactly on a midpoint goes to
// the lower code, NaN to code 0 (as bitsandbytes' decision tree does).
SLOTH_HD uint8_t nf4_encode(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

// Smallest absmax used as a divisor: an all-zero block encodes as zeros, never NaN.
constexpr float kMinAbsmax = 1e-38f;

// Nearest entry of a sorted 256-entry code (bitsandbytes' dynamic map) to x in [-1, 1]:
// binary search over the midpoints, a value exactly on a midpoint goes to the lower entry.
SLOTH_HD uint8_t code256_encode(const float* code, float x) {
  int lo = 0, hi = 255;  // answer in [lo, hi]
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    float bound = mul_rn(add_rn(code[mid], code[mid + 1]), 0.5f);
    if (x > bound) lo = mid + 1; else hi = mid;
  }
  return (uint8_t)lo;
}

}  // namespace sloth
