// RMSNorm and rotary embedding (RoPE): per-element math shared by the CPU and GPU kernels, fp32.
//
// RMSNorm of one row x[H]:  rstd = 1 / sqrt(mean(x^2) + eps),  n = x * rstd,  g = offset + w,
//   Gemma order (cast_before_weight = false):  y = round(n * g)                (Gemma3RMSNorm)
//   Llama order (cast_before_weight = true):   y = round(round(n) * g)         (LlamaRMSNorm: n is cast
//                                              to the input dtype before the weight multiply)
// Backward (per row, D = sum_j dy_j g_j n_j / H):  dx = rstd * (dy * g - n * D),  dw = sum_rows dy * n'
//   (n' = round(n) in the Llama order, as autograd of LlamaRMSNorm sees it; rounding is straight-through).
//
// RoPE, HF "rotate_half" convention on the first rot_dim dims (h = rot_dim / 2), cos / sin [rot_dim]:
//   forward:  y[i]   = x[i] c[i] - x[i+h] s[i],        y[i+h] = x[i+h] c[i+h] + x[i] s[i+h]
//   inverse (the transpose, = forward with -sin when the halves of cos / sin are equal, as HF builds them):
//             x[i]   = y[i] c[i] + y[i+h] s[i+h],      x[i+h] = y[i+h] c[i+h] - y[i] s[i]
#pragma once
#include <math.h>

#include "sloth/numeric.h"
#include "sloth/portability.h"

namespace sloth {

// The normalized value as the weight multiply sees it: n, or n rounded to the storage type T.
template <OutType T>
SLOTH_HD float rms_norm_n(float x, float rstd, bool cast_before_weight) {
  const float n = x * rstd;
  return cast_before_weight ? to_float<T>(from_float<T>(n)) : n;
}

template <OutType T>
SLOTH_HD typename OutStorage<T>::type rms_norm_y(float x, float rstd, float w, float offset, bool cast_before_weight) {
  return from_float<T>(rms_norm_n<T>(x, rstd, cast_before_weight) * (offset + w));
}

SLOTH_HD float rms_norm_rstd(float sum_sq, int64_t H, float eps) {
  return 1.0f / sqrtf(sum_sq / (float)H + eps);
}

struct RopePair {
  float a, b;  // new x[i], new x[i + h]
};

// One rotary pair (x1 = x[i], x2 = x[i+h]) with c1 = cos[i], c2 = cos[i+h], s1 = sin[i], s2 = sin[i+h].
SLOTH_HD RopePair rope_pair(float x1, float x2, float c1, float c2, float s1, float s2, bool inverse) {
  if (!inverse) return {x1 * c1 - x2 * s1, x2 * c2 + x1 * s2};
  return {x1 * c1 + x2 * s2, x2 * c2 - x1 * s1};
}

}  // namespace sloth
