// Per-element math of the chunked linear cross-entropy, shared by the CPU and CUDA kernels.
//
// A row of raw logits x (the GEMM output h W^T + b) becomes z = logit_transform(x):
//   z = logit_scale * x                                  (softcap <= 0)
//   z = softcap * tanh(logit_scale * x / softcap)        (softcap > 0, Gemma 2/3 final-logit softcapping)
// Softmax statistics are kept online in fp32 as (m, s, t): m = running max, s = sum exp(z - m),
// t = sum exp(z - m) * z, so lse = m + log s and E_p[z] = t / s (entropy = lse - E_p[z]).
// The gradient written back for each element is
//   dx = (c_nll * (p - onehot) - c_ent * p * (z - E_p[z])) * dz/dx
// which is d/dx of c_nll * (lse - z_label) + c_ent * entropy.
#pragma once
#include <math.h>

#include "sloth/portability.h"

namespace sloth {

SLOTH_HD float ce_exp(float v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __expf(v);
#else
  return expf(v);
#endif
}

// z from the raw logit x.
SLOTH_HD float ce_logit(float x, float logit_scale, float softcap) {
  const float y = x * logit_scale;
  return softcap > 0.0f ? softcap * tanhf(y / softcap) : y;
}

// dz/dx, from z (softcap: d/dx cap * tanh(s x / cap) = s * (1 - tanh^2) = s * (1 - (z / cap)^2)).
SLOTH_HD float ce_dlogit(float z, float logit_scale, float softcap) {
  if (softcap > 0.0f) {
    const float t = z / softcap;
    return logit_scale * (1.0f - t * t);
  }
  return logit_scale;
}

// Online softmax state over a set of logits z: m = max, s = sum exp(z - m), t = sum exp(z - m) z.
struct CeState {
  float m, s, t;
};

SLOTH_HD CeState ce_state_empty() { return CeState{-INFINITY, 0.0f, 0.0f}; }

// Adds one logit.
SLOTH_HD void ce_state_add(CeState& st, float z) {
  if (z > st.m) {
    const float r = st.m == -INFINITY ? 0.0f : ce_exp(st.m - z);
    st.s = st.s * r + 1.0f;
    st.t = st.t * r + z;
    st.m = z;
  } else if (z != -INFINITY) {
    const float e = ce_exp(z - st.m);
    st.s += e;
    st.t += e * z;
  }
}

// Merges two states (order-independent up to rounding).
SLOTH_HD CeState ce_state_merge(CeState a, CeState b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const float m = a.m > b.m ? a.m : b.m;
  const float ra = ce_exp(a.m - m), rb = ce_exp(b.m - m);
  return CeState{m, a.s * ra + b.s * rb, a.t * ra + b.t * rb};
}

SLOTH_HD float ce_lse(CeState st) { return st.m + logf(st.s); }
SLOTH_HD float ce_mean_logit(CeState st) { return st.t / st.s; }

// Gradient w.r.t. the raw logit x of c_nll * (lse - z_label) + c_ent * entropy, for one element.
SLOTH_HD float ce_grad(float z, bool is_label, float lse, float mean_z, float c_nll, float c_ent,
                       float logit_scale, float softcap) {
  const float p = ce_exp(z - lse);
  const float g = c_nll * (is_label ? p - 1.0f : p) - c_ent * p * (z - mean_z);
  return g * ce_dlogit(z, logit_scale, softcap);
}

// ---- Online linear cross-entropy for a frozen head (no [rows, V] logits kept, only a [rows, Vb] block) ----
// The logits of a row arrive in vocabulary blocks. Per row, in fp32: m = reference max, s = sum exp(z - m)
// over the blocks seen, and the label's z and dz/dx once its block passes. Each block's raw logits are
// replaced by p'_v = exp(z_v - m) dz_v/dx_v, so that the caller's GEMM acc += p' W_block accumulates
// acc = sum_v exp(z_v - m) dz_v/dx_v W_v; acc is rescaled by exp(m_old - m_new) when m moves. At the end
//   loss = m + log s - z_label,  dh = acc / s - dz/dx_label W_label   (d/dh of the loss, W frozen).
// m only moves when a block's max exceeds it by more than `margin` (so p' <= e^margin dz/dx and most rows
// need no rescale after their first block); margin 0 keeps p' <= dz/dx (fp16, whose range ends at 65504).
struct CeOnlineState {
  float m, s, z_label, d_label;
};

// The reference max after a block whose largest z is block_max.
SLOTH_HD float ce_online_max(float m_old, float block_max, float margin) {
  return (m_old == -INFINITY || block_max > m_old + margin) ? block_max : m_old;
}

// Factor that brings sums taken against m_old to m_new (0 when nothing was summed yet).
SLOTH_HD float ce_online_rescale(float m_old, float m_new) {
  if (m_old == m_new) return 1.0f;
  return m_old == -INFINITY ? 0.0f : ce_exp(m_old - m_new);
}

// exp(z - m), 0 for z = -inf (a masked logit) whatever m is.
SLOTH_HD float ce_online_exp(float z, float m) { return z == -INFINITY ? 0.0f : ce_exp(z - m); }

// The loss coefficient of a row: 0 on an ignored row, c on a valid one, and NaN for a label outside [0, V) (not
// ignore_index): its loss is NaN and so is its whole gradient (never a finite gradient an optimizer would step on).
SLOTH_HD float ce_row_coef(bool ignored, bool valid, float c) {
  if (ignored) return 0.0f;
  return valid ? c : NAN;
}

// Loss of a finished row: lse - z_label, 0 on ignored rows, NaN for a label outside [0, V).
SLOTH_HD float ce_online_loss(CeOnlineState st, bool ignored, bool valid) {
  if (valid) return st.m + logf(st.s) - st.z_label;
  return ignored ? 0.0f : NAN;
}

}  // namespace sloth
