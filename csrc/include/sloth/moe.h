// Mixture-of-experts math shared by the CPU and GPU kernels: the GLU variants of MoE experts (forward and
// derivatives) and the element decode of a dense / NF4 / MXFP4 expert weight stack.
//
// GLU kinds (python/sloth/reference/moe.py): 0 none, 1 SwiGLU with [gate; up] concatenated on the output dim,
// 2 SwiGLU interleaved (gate = even, up = odd column), 3 gpt-oss clamped GLU interleaved, 4 the clamped GLU
// concatenated. gpt-oss (Transformers' GptOssExperts._apply_gate):
//   g = min(gate, limit), u = clamp(up, -limit, limit), h = (u + 1) * g * sigmoid(alpha * g)
#pragma once
#include <math.h>
#include <stdint.h>

#include "sloth/mxfp4.h"
#include "sloth/nf4.h"
#include "sloth/numeric.h"
#include "sloth/portability.h"

namespace sloth {

enum MoeGlu : int { kMoeGluNone = 0, kMoeSwiGLU = 1, kMoeSwiGLUInterleaved = 2, kMoeClampedInterleaved = 3,
                    kMoeClamped = 4 };

SLOTH_HD bool moe_glu_interleaved(int g) { return g == kMoeSwiGLUInterleaved || g == kMoeClampedInterleaved; }
SLOTH_HD bool moe_glu_clamped(int g) { return g == kMoeClampedInterleaved || g == kMoeClamped; }

SLOTH_HD float moe_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// h = glu(gate, up) for kinds 1-4.
SLOTH_HD float moe_glu_fwd(int kind, float gate, float up, float alpha, float limit) {
  if (moe_glu_clamped(kind)) {
    const float g = fminf(gate, limit);
    const float u = fminf(fmaxf(up, -limit), limit);
    return (u + 1.0f) * (g * moe_sigmoid(alpha * g));
  }
  return gate * moe_sigmoid(gate) * up;
}

// d gate, d up of h = glu(gate, up) given dh. The clamps pass the gradient where the input lies inside
// them, bounds included (torch.clamp's backward).
SLOTH_HD void moe_glu_bwd(int kind, float dh, float gate, float up, float alpha, float limit, float* dgate,
                          float* dup) {
  if (moe_glu_clamped(kind)) {
    const float g = fminf(gate, limit);
    const float u = fminf(fmaxf(up, -limit), limit);
    const float s = moe_sigmoid(alpha * g);
    const float glu = g * s;
    *dgate = gate <= limit ? dh * (u + 1.0f) * (s + g * alpha * s * (1.0f - s)) : 0.0f;
    *dup = (up >= -limit && up <= limit) ? dh * glu : 0.0f;
    return;
  }
  const float s = moe_sigmoid(gate);
  *dgate = dh * up * s * (1.0f + gate * (1.0f - s));
  *dup = dh * gate * s;
}

// E2M1 value of a 4-bit code without a table (see nf4_value).
SLOTH_HD float e2m1_value(uint32_t q) {
  float m;
  if (q & 4) m = (q & 2) ? ((q & 1) ? 6.0f : 4.0f) : ((q & 1) ? 3.0f : 2.0f);
  else m = (q & 2) ? ((q & 1) ? 1.5f : 1.0f) : ((q & 1) ? 0.5f : 0.0f);
  return (q & 8) ? -m : m;
}

enum MoeFormat : int { kMoeDense = 0, kMoeNf4 = 1, kMoeMxfp4 = 2 };

// An expert stack stored [E, A, B]: dense (any strides, elements of dense_type), NF4 (the flattened
// E * A * B tensor in bitsandbytes' layout: element 2j in the high nibble, absmax per `blocksize` elements,
// optionally double-quantized with an offset per expert or one for all) or MXFP4 (blocks [E, A, B / 32, 16]
// with element 2j in the low nibble, E8M0 scales [E, A, B / 32]). NF4 / MXFP4 run along B.
struct MoeWeight {
  int fmt = kMoeDense;
  const void* data = nullptr;
  OutType dense_type = OutType::kBF16;
  int64_t E = 0, A = 0, B = 0;
  int64_t s_e = 0, s_a = 0, s_b = 1;  // dense strides, in elements
  const float* absmax = nullptr;      // NF4 fp32 absmax [E * A * B / blocksize]
  const uint8_t* absmax_q = nullptr;  // or uint8 with code2 [256], absmax2, offset
  const float* code2 = nullptr;
  const float* absmax2 = nullptr;
  const float* offset = nullptr;
  int offset_per_expert = 0;          // one double quantization per expert: offset [E], absmax2 per expert
  int64_t nb_e = 0, nb2_e = 0;        // absmax / absmax2 entries per expert (offset_per_expert)
  int blocksize = 64;
  int log2_blocksize2 = 8;
  const uint8_t* scales = nullptr;  // MXFP4 scales
};

// The NF4 absmax of quantization block `blk` of expert e.
SLOTH_HD float moe_nf4_absmax(const MoeWeight& w, int64_t blk, int64_t e) {
  if (w.absmax) return w.absmax[blk];
  if (w.offset_per_expert)
    return w.code2[w.absmax_q[blk]] * w.absmax2[e * w.nb2_e + ((blk - e * w.nb_e) >> w.log2_blocksize2)] + w.offset[e];
  return w.code2[w.absmax_q[blk]] * w.absmax2[blk >> w.log2_blocksize2] + w.offset[0];
}

// Element (e, a, b) of the stack as fp32 (for 4-bit formats: value * scale, exactly as the dequantize ops).
SLOTH_HD float moe_weight_at(const MoeWeight& w, int64_t e, int64_t a, int64_t b) {
  if (w.fmt == kMoeDense) {
    const int64_t i = e * w.s_e + a * w.s_a + b * w.s_b;
    switch (w.dense_type) {
      case OutType::kF32: return static_cast<const float*>(w.data)[i];
      case OutType::kF16: return fp16_bits_to_float(static_cast<const uint16_t*>(w.data)[i]);
      default: return bf16_bits_to_float(static_cast<const uint16_t*>(w.data)[i]);
    }
  }
  const int64_t g = (e * w.A + a) * w.B + b;
  const uint8_t byte = static_cast<const uint8_t*>(w.data)[g >> 1];
  if (w.fmt == kMoeNf4) {
    const uint32_t q = (g & 1) ? (byte & 15u) : (byte >> 4);
    return mul_rn(nf4_value(q), moe_nf4_absmax(w, g / w.blocksize, e));
  }
  const uint32_t q = (g & 1) ? (byte >> 4) : (byte & 15u);
  const uint8_t s = w.scales[g >> 5];
  return mx_scale_value(e2m1_value(q), e8m0_to_float(s), s);
}

}  // namespace sloth
