// Attention masking and score math shared by the CPU and CUDA kernels (sinks, sliding window, softcap).
//
// Within one document of Lq queries and Lk keys, query i sits at key position i + (Lk - Lq) (bottom-right
// alignment: a decode step's queries are the last ones). Query i sees key j iff
//   0 <= j < Lk,  (causal) j <= i + off,  (window > 0) j > i + off - window,  with off = Lk - Lq.
// Scores: s = scale * q.k, then softcap * tanh(s / softcap) when softcap > 0. The sink of a head is one more
// logit in the softmax denominator with a zero value vector.
#pragma once
#include <math.h>
#include <stdint.h>

#include "sloth/portability.h"

namespace sloth {

struct AttnMask {
  int64_t off = 0;     // Lk - Lq
  int64_t Lk = 0;      // keys of the document
  int64_t window = 0;  // 0: none
  bool causal = true;

  SLOTH_HD bool visible(int64_t i, int64_t j) const {
    if (j < 0 || j >= Lk) return false;
    if (causal && j > i + off) return false;
    if (window > 0 && j <= i + off - window) return false;
    return true;
  }
  // First key any query of [i0, i1) sees (keys below it are masked for every such query).
  SLOTH_HD int64_t key_begin(int64_t i0) const {
    int64_t b = window > 0 ? i0 + off - window + 1 : 0;
    return b > 0 ? b : 0;
  }
  // One past the last key any query of [i0, i1) sees.
  SLOTH_HD int64_t key_end(int64_t i1) const {
    int64_t e = causal ? i1 + off : Lk;  // query i1 - 1 sees up to i1 - 1 + off
    return e < Lk ? (e > 0 ? e : 0) : Lk;
  }
  // Queries that see some key of [j0, j1), within [0, Lq): [query_begin, query_end).
  SLOTH_HD int64_t query_begin(int64_t j0) const {
    int64_t b = causal ? j0 - off : 0;
    return b > 0 ? b : 0;
  }
  SLOTH_HD int64_t query_end(int64_t j1, int64_t Lq) const {
    int64_t e = window > 0 ? j1 - 1 - off + window : Lq;  // key j1 - 1 is seen by queries i < j1 - 1 - off + window
    return e < Lq ? (e > 0 ? e : 0) : Lq;
  }
  // Whether every (query, key) of the block [i0, i1) x [j0, j1) is visible (no per-element masking needed).
  SLOTH_HD bool block_full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (j1 > Lk || j0 < 0) return false;
    if (causal && j1 - 1 > i0 + off) return false;
    if (window > 0 && j0 <= (i1 - 1) + off - window) return false;
    return true;
  }
};

// Softcapped score and the factor d(capped)/d(scaled) = 1 - tanh^2 for the backward.
SLOTH_HD float attn_softcap(float s, float softcap, float inv_softcap) {
  return softcap > 0.f ? softcap * tanhf(s * inv_softcap) : s;
}
// Given the capped score c = softcap * tanh(s / softcap): 1 - (c / softcap)^2.
SLOTH_HD float attn_softcap_grad(float capped, float inv_softcap) {
  const float t = capped * inv_softcap;
  return inv_softcap > 0.f ? 1.f - t * t : 1.f;
}

}  // namespace sloth
