// CPU kernels of the attention ops (sinks, sliding window, softcap, GQA, packed documents): forward with an
// online softmax per query, backward by recomputing the probabilities from the saved lse. fp32 math on
// fp32 copies of the inputs; simple loops, parallel over (document, head). Meant for tests and CPU use.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention_checks.h"
#include "sloth/attention.h"

namespace sloth::cpu {
namespace {

// Document start offsets (tokens) of queries and keys: from cu_seqlens, or b * S for the dense layout.
struct Docs {
  std::vector<int64_t> q, k;  // [B + 1]
};

Docs doc_offsets(const AttnShape& s, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k) {
  Docs d;
  d.q.resize(s.B + 1);
  d.k.resize(s.B + 1);
  if (s.varlen) {
    at::Tensor cq = cu_q->to(at::kLong).contiguous(), ck = cu_k->to(at::kLong).contiguous();
    for (int64_t b = 0; b <= s.B; ++b) d.q[b] = cq.data_ptr<int64_t>()[b], d.k[b] = ck.data_ptr<int64_t>()[b];
    for (int64_t b = 0; b < s.B; ++b) {
      TORCH_CHECK(d.q[b] <= d.q[b + 1] && d.k[b] <= d.k[b + 1] && d.q[0] >= 0 && d.k[0] >= 0,
                  "sloth.attention: cu_seqlens must be non-decreasing and start at >= 0");
    }
    TORCH_CHECK(d.q[s.B] <= s.Tq && d.k[s.B] <= s.Tk, "sloth.attention: cu_seqlens end (", d.q[s.B], ", ", d.k[s.B],
                ") beyond the tokens of q / k (", s.Tq, ", ", s.Tk, ")");
  } else {
    for (int64_t b = 0; b <= s.B; ++b) d.q[b] = b * s.Sq, d.k[b] = b * s.Sk;
  }
  return d;
}

at::Tensor flat_float(const at::Tensor& x, int64_t tokens) {
  return x.to(at::kFloat).contiguous().view({tokens, x.size(-2), x.size(-1)});
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                     const std::optional<at::Tensor>& sinks_,
                                                     const std::optional<at::Tensor>& cu_q,
                                                     const std::optional<at::Tensor>& cu_k, int64_t max_seqlen_q,
                                                     int64_t max_seqlen_k, double scale, bool causal, int64_t window,
                                                     double softcap) {
  const AttnShape s =
      check_attention_args(q_, k_, v_, sinks_, cu_q, cu_k, max_seqlen_q, max_seqlen_k, window, "attention_forward");
  const Docs docs = doc_offsets(s, cu_q, cu_k);
  at::Tensor q = flat_float(q_, s.Tq), k = flat_float(k_, s.Tk), v = flat_float(v_, s.Tk);  // [T, H, D]
  at::Tensor out = at::zeros({s.Tq, s.Hq, s.D}, q.options());
  at::Tensor lse = at::full({s.Hq, s.Tq}, -std::numeric_limits<float>::infinity(), q.options());  // [Hq, Tq]
  at::Tensor sinks = sinks_ ? sinks_->contiguous() : at::Tensor();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float* sp = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
  const int64_t Hq = s.Hq, Hkv = s.Hkv, D = s.D, group = s.Hq / s.Hkv, Tq = s.Tq;
  const float fscale = (float)scale, cap = (float)softcap, inv_cap = softcap > 0 ? (float)(1.0 / softcap) : 0.f;

  at::parallel_for(0, s.B * Hq, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> acc(D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hq, h = w % Hq, hk = h / group;
      const int64_t Lq = docs.q[b + 1] - docs.q[b], Lk = docs.k[b + 1] - docs.k[b];
      const AttnMask mask{Lk - Lq, Lk, window > 0 ? window : 0, causal};
      for (int64_t i = 0; i < Lq; ++i) {
        const float* qi = qp + ((docs.q[b] + i) * Hq + h) * D;
        float m = sp ? sp[h] : -INFINITY, l = sp ? 1.f : 0.f;  // the sink: exp(sink - m) = 1 with m = sink
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = mask.key_begin(i), je = mask.key_end(i + 1); j < je; ++j) {
          if (!mask.visible(i, j)) continue;
          const int64_t kt = (docs.k[b] + j) * Hkv + hk;
          const float sc = attn_softcap(fscale * dot(qi, kp + kt * D, D), cap, inv_cap);
          if (sc > m) {
            const float r = std::exp(m - sc);  // 0 when m = -inf
            l *= r;
            for (int64_t d = 0; d < D; ++d) acc[d] *= r;
            m = sc;
          }
          const float p = std::exp(sc - m);
          l += p;
          const float* vj = vp + kt * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * vj[d];
        }
        const int64_t t = docs.q[b] + i;
        if (l > 0.f) {
          float* o = op + (t * Hq + h) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = acc[d] / l;
          lp[h * Tq + t] = m + std::log(l);
        }
      }
    }
  });
  at::Tensor out_shaped = out.to(q_.scalar_type());
  if (s.varlen) return {out_shaped, lse};
  return {out_shaped.view({s.B, s.Sq, Hq, D}), lse.view({Hq, s.B, s.Sq}).permute({1, 0, 2}).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const std::optional<at::Tensor>& sinks_, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    int64_t window, double softcap) {
  const AttnShape s =
      check_attention_args(q_, k_, v_, sinks_, cu_q, cu_k, max_seqlen_q, max_seqlen_k, window, "attention_backward");
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "sloth.attention_backward: dout and out must have q's shape ", q_.sizes());
  TORCH_CHECK(lse_.scalar_type() == at::kFloat && lse_.sizes() == at::IntArrayRef(attention_lse_shape(s)),
              "sloth.attention_backward: lse must be float32 ", at::IntArrayRef(attention_lse_shape(s)));
  const Docs docs = doc_offsets(s, cu_q, cu_k);
  at::Tensor q = flat_float(q_, s.Tq), k = flat_float(k_, s.Tk), v = flat_float(v_, s.Tk);
  at::Tensor dout = flat_float(dout_, s.Tq), out = flat_float(out_, s.Tq);
  at::Tensor lse = s.varlen ? lse_.contiguous() : lse_.permute({1, 0, 2}).reshape({s.Hq, s.Tq});  // [Hq, Tq]
  at::Tensor sinks = sinks_ ? sinks_->contiguous() : at::Tensor();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t Hq = s.Hq, Hkv = s.Hkv, D = s.D, group = s.Hq / s.Hkv, Tq = s.Tq;
  // dsinks per (document, head), summed after the parallel loop (no shared accumulator).
  std::vector<double> dsink_parts(s.B * Hq, 0.0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* dop = dout.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const float* sp = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float fscale = (float)scale, cap = (float)softcap, inv_cap = softcap > 0 ? (float)(1.0 / softcap) : 0.f;

  // One task per (document, kv head): it owns dk / dv of its keys and dq of its group's query heads.
  at::parallel_for(0, s.B * Hkv, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hkv, hk = w % Hkv;
      const int64_t Lq = docs.q[b + 1] - docs.q[b], Lk = docs.k[b + 1] - docs.k[b];
      const AttnMask mask{Lk - Lq, Lk, window > 0 ? window : 0, causal};
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        double dsink = 0.0;
        for (int64_t i = 0; i < Lq; ++i) {
          const int64_t t = docs.q[b] + i;
          const float* qi = qp + (t * Hq + h) * D;
          const float* doi = dop + (t * Hq + h) * D;
          float* dqi = dqp + (t * Hq + h) * D;
          const float lse_i = lp[h * Tq + t];
          if (lse_i == -INFINITY) continue;  // the row sees nothing: out = 0, no gradient
          const float Di = dot(doi, op + (t * Hq + h) * D, D);  // rowsum(dO * O)
          if (sp) dsink -= (double)std::exp(sp[h] - lse_i) * Di;
          for (int64_t j = mask.key_begin(i), je = mask.key_end(i + 1); j < je; ++j) {
            if (!mask.visible(i, j)) continue;
            const int64_t kt = (docs.k[b] + j) * Hkv + hk;
            const float* kj = kp + kt * D;
            const float* vj = vp + kt * D;
            const float sc = attn_softcap(fscale * dot(qi, kj, D), cap, inv_cap);
            const float p = std::exp(sc - lse_i);
            const float dp = dot(doi, vj, D);
            const float ds = p * (dp - Di) * attn_softcap_grad(sc, inv_cap) * fscale;  // d loss / d (q.k)
            float* dkj = dkp + kt * D;
            float* dvj = dvp + kt * D;
            for (int64_t d = 0; d < D; ++d) {
              dvj[d] += p * doi[d];
              dqi[d] += ds * kj[d];
              dkj[d] += ds * qi[d];
            }
          }
        }
        dsink_parts[b * Hq + h] = dsink;
      }
    }
  });
  at::Tensor dsinks = at::zeros({sp ? Hq : 0}, q.options());
  for (int64_t h = 0; sp && h < Hq; ++h) {
    double total = 0.0;
    for (int64_t b = 0; b < s.B; ++b) total += dsink_parts[b * Hq + h];
    dsinks.data_ptr<float>()[h] = (float)total;
  }
  const auto dt = q_.scalar_type();
  return {dq.to(dt).view(q_.sizes()), dk.to(dt).view(k_.sizes()), dv.to(dt).view(v_.sizes()), dsinks};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace sloth::cpu
