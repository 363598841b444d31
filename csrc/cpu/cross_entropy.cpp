// CPU kernel of the chunked linear cross-entropy (same semantics as csrc/cuda/cross_entropy.cu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "sloth/cross_entropy.h"
#include "sloth/numeric.h"
#include "sloth/op_checks.h"

namespace sloth::cpu {
namespace {

struct CeRowArgs {
  const int64_t* labels;
  const float* grad_nll;      // [rows] or null (= 1)
  const float* grad_entropy;  // [rows] or null (= 0)
  float grad_scale, softcap, logit_scale;
  int64_t ignore_index;
  bool compute_grad;
  float *loss, *lse, *entropy;
};

// Per row: online (max, sum exp, sum exp * z) over V in fp32, then (compute_grad) the gradient in place.
// Traffic: reads the [rows, V] logits twice, writes them once when compute_grad.
template <OutType T>
void ce_rows(typename OutStorage<T>::type* logits, int64_t rows, int64_t V, const CeRowArgs& a) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      auto* row = logits + r * V;
      CeState st = ce_state_empty();
      for (int64_t j = 0; j < V; ++j) ce_state_add(st, ce_logit(to_float<T>(row[j]), a.logit_scale, a.softcap));
      const float lse = ce_lse(st), mean_z = ce_mean_logit(st);
      const int64_t label = a.labels[r];
      const bool ignored = label == a.ignore_index;
      const bool valid = !ignored && label >= 0 && label < V;
      float loss = 0.0f;
      if (valid) loss = lse - ce_logit(to_float<T>(row[label]), a.logit_scale, a.softcap);
      else if (!ignored) loss = std::numeric_limits<float>::quiet_NaN();  // label out of range
      a.loss[r] = loss;
      a.lse[r] = lse;
      a.entropy[r] = lse - mean_z;
      if (!a.compute_grad) continue;
      const float c_nll = ce_row_coef(ignored, valid, a.grad_scale * (a.grad_nll ? a.grad_nll[r] : 1.0f));
      const float c_ent = ignored ? 0.0f : a.grad_scale * (a.grad_entropy ? a.grad_entropy[r] : 0.0f);
      for (int64_t j = 0; j < V; ++j) {
        const float z = ce_logit(to_float<T>(row[j]), a.logit_scale, a.softcap);
        row[j] = from_float<T>(ce_grad(z, j == label, lse, mean_z, c_nll, c_ent, a.logit_scale, a.softcap));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_chunk(
    at::Tensor& logits, const at::Tensor& labels_, const std::optional<at::Tensor>& grad_nll_,
    const std::optional<at::Tensor>& grad_entropy_, double grad_scale, int64_t ignore_index, double softcap,
    double logit_scale, bool compute_grad) {
  check_cross_entropy_chunk_args(logits, labels_, grad_nll_, grad_entropy_);
  const int64_t rows = logits.size(0), V = logits.size(1);
  at::Tensor labels = labels_.to(at::kLong).contiguous();
  at::Tensor grad_nll, grad_entropy;
  if (grad_nll_) grad_nll = grad_nll_->to(at::kFloat).contiguous();
  if (grad_entropy_) grad_entropy = grad_entropy_->to(at::kFloat).contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32), entropy = at::empty({rows}, f32);
  if (rows == 0) return {loss, lse, entropy};
  CeRowArgs a{labels.data_ptr<int64_t>(),
              grad_nll.defined() ? grad_nll.data_ptr<float>() : nullptr,
              grad_entropy.defined() ? grad_entropy.data_ptr<float>() : nullptr,
              (float)grad_scale, (float)softcap, (float)logit_scale, ignore_index, compute_grad,
              loss.data_ptr<float>(), lse.data_ptr<float>(), entropy.data_ptr<float>()};
  dispatch_out_type(out_type_of(logits.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    ce_rows<T>(static_cast<typename OutStorage<T>::type*>(logits.data_ptr()), rows, V, a);
  });
  return {loss, lse, entropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) { m.impl("cross_entropy_chunk", &cross_entropy_chunk); }

}  // namespace sloth::cpu
