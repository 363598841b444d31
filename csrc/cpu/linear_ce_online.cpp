// CPU kernels of the online linear cross-entropy for a frozen head (same semantics as
// csrc/cuda/linear_ce_online.cu; the math is csrc/include/sloth/cross_entropy.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "sloth/cross_entropy.h"
#include "sloth/numeric.h"
#include "sloth/op_checks.h"

namespace sloth::cpu {
namespace {

template <OutType T>
using raw_t = typename OutStorage<T>::type;

// Per row: block max of z, then p' = exp(z - m) dz/dx in place, the state update and the acc rescale.
// Traffic: reads the [rows, vb] block twice and writes it once; reads and writes acc rows that are rescaled.
template <OutType T>
void block_rows(raw_t<T>* logits, int64_t rows, int64_t vb, const int64_t* labels, int64_t v0, float* state,
                float* acc, int64_t H, float softcap, float logit_scale, float margin) {
  const bool first = v0 == 0;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      raw_t<T>* row = logits + r * vb;
      float* st = state + 4 * r;
      float z_label = first ? 0.0f : st[2], d_label = first ? 0.0f : st[3];
      const int64_t lab = labels[r] - v0;
      if (lab >= 0 && lab < vb) {
        z_label = ce_logit(to_float<T>(row[lab]), logit_scale, softcap);
        d_label = ce_dlogit(z_label, logit_scale, softcap);
      }
      float mx = -INFINITY;
      for (int64_t j = 0; j < vb; ++j) mx = std::fmax(mx, ce_logit(to_float<T>(row[j]), logit_scale, softcap));
      const float m_old = first ? -INFINITY : st[0];
      const float m = ce_online_max(m_old, mx, margin);
      float sum = 0.0f;
      for (int64_t j = 0; j < vb; ++j) {
        const float z = ce_logit(to_float<T>(row[j]), logit_scale, softcap);
        const float e = ce_online_exp(z, m);
        sum += e;
        row[j] = from_float<T>(e * ce_dlogit(z, logit_scale, softcap));
      }
      const float alpha = ce_online_rescale(m_old, m);
      st[1] = (first ? 0.0f : st[1]) * alpha + sum;
      st[0] = m;
      st[2] = z_label;
      st[3] = d_label;
      if (!first && alpha != 1.0f)
        for (int64_t j = 0; j < H; ++j) acc[r * H + j] *= alpha;
    }
  });
}

void ce_online_block(at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, at::Tensor& state,
                     at::Tensor& acc, double softcap, double logit_scale, double margin) {
  check_ce_online_block_args(logits, labels, state, acc);
  dispatch_out_type(out_type_of(logits.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    block_rows<T>(static_cast<raw_t<T>*>(logits.data_ptr()), logits.size(0), logits.size(1),
                  labels.data_ptr<int64_t>(), vocab_start, state.data_ptr<float>(), acc.data_ptr<float>(),
                  acc.size(1), (float)softcap, (float)logit_scale, (float)margin);
  });
}

// Per row: loss from the state; dh = c (acc / s - dz/dx_label W[label]), c = row_scale or 1 (0 if ignored). Traffic: acc, one W row, dh.
at::Tensor ce_online_finish(const at::Tensor& state, const at::Tensor& acc, const at::Tensor& weight,
                            const at::Tensor& labels, const std::optional<at::Tensor>& row_scale_,
                            int64_t ignore_index, at::Tensor& dh) {
  const at::Tensor row_scale = check_ce_online_finish_args(state, acc, weight, labels, row_scale_, dh);
  const int64_t rows = acc.size(0), H = acc.size(1), V = weight.size(0);
  const float* scale_p = row_scale.defined() ? row_scale.data_ptr<float>() : nullptr;
  at::Tensor loss = at::empty({rows}, acc.options());
  const float* st_all = state.data_ptr<float>();
  const float* acc_p = acc.data_ptr<float>();
  const int64_t* lab_p = labels.data_ptr<int64_t>();
  float* loss_p = loss.data_ptr<float>();
  dispatch_out_type(out_type_of(weight.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    const auto* w = static_cast<const raw_t<T>*>(weight.data_ptr());
    auto* out = static_cast<raw_t<T>*>(dh.data_ptr());
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* s = st_all + 4 * r;
        const CeOnlineState st{s[0], s[1], s[2], s[3]};
        const int64_t label = lab_p[r];
        const bool ignored = label == ignore_index;
        const bool valid = !ignored && label >= 0 && label < V;
        loss_p[r] = ce_online_loss(st, ignored, valid);
        const float c = ce_row_coef(ignored, valid, scale_p ? scale_p[r] : 1.0f);  // NaN: a label outside [0, V)
        const float inv_s = c == 0.0f ? 0.0f : c / st.s;
        const float dl = valid ? c * st.d_label : 0.0f;
        const raw_t<T>* wr = w + (valid ? label : 0) * H;
        for (int64_t j = 0; j < H; ++j)
          out[r * H + j] = from_float<T>(acc_p[r * H + j] * inv_s - dl * to_float<T>(wr[j]));
      }
    });
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("ce_online_block", &ce_online_block);
  m.impl("ce_online_finish", &ce_online_finish);
}

}  // namespace sloth::cpu
