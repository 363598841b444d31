// GLU activations (SwiGLU, GeGLU with tanh or erf GELU): forward and derivatives, fp32 per element,
// shared by the CPU and GPU kernels.
//   h = act(gate) * up;  d_up = dh * act(gate);  d_gate = dh * up * act'(gate)
#pragma once
#include <math.h>

#include <type_traits>

#include "sloth/portability.h"

namespace sloth {

enum class GluKind : int { kSwiGLU = 0, kGeGLUTanh = 1, kGeGLUErf = 2 };

struct GluGrad {
  float act;   // act(gate)
  float dact;  // act'(gate)
};

SLOTH_HD float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// act(g) and act'(g) for one kind.
template <GluKind K>
SLOTH_HD GluGrad glu_act(float g) {
  if constexpr (K == GluKind::kSwiGLU) {
    const float s = sigmoidf_(g);
    return {g * s, s * (1.0f + g * (1.0f - s))};
  } else if constexpr (K == GluKind::kGeGLUTanh) {
    constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
    constexpr float kA = 0.044715f;
    const float inner = kC * (g + kA * g * g * g);
    const float t = tanhf(inner);
    const float act = 0.5f * g * (1.0f + t);
    const float dact = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kC * (1.0f + 3.0f * kA * g * g);
    return {act, dact};
  } else {
    constexpr float kInvSqrt2 = 0.7071067811865476f;
    constexpr float kInvSqrt2Pi = 0.3989422804014327f;
    const float cdf = 0.5f * (1.0f + erff(g * kInvSqrt2));
    return {g * cdf, cdf + g * kInvSqrt2Pi * expf(-0.5f * g * g)};
  }
}

// Forward only (cheaper than glu_act for SwiGLU: no derivative).
template <GluKind K>
SLOTH_HD float glu_fwd(float g, float u) {
  if constexpr (K == GluKind::kSwiGLU) {
    return g * sigmoidf_(g) * u;
  } else {
    return glu_act<K>(g).act * u;
  }
}

// Calls fn(std::integral_constant<GluKind, K>{}) for the runtime kind (0, 1, 2); false if unknown.
template <typename Fn>
bool dispatch_glu_kind(int kind, Fn&& fn) {
  switch (kind) {
    case 0: fn(std::integral_constant<GluKind, GluKind::kSwiGLU>{}); return true;
    case 1: fn(std::integral_constant<GluKind, GluKind::kGeGLUTanh>{}); return true;
    case 2: fn(std::integral_constant<GluKind, GluKind::kGeGLUErf>{}); return true;
    default: return false;
  }
}

}  // namespace sloth
