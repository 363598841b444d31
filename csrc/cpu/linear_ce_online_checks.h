// Argument checks of the online linear cross-entropy ops (ce_online_block, ce_online_finish), shared by the CPU
// kernels and the CUDA / HIP bindings (python/sloth/ops/cross_entropy.py checks first, with friendlier errors;
// these guard direct torch.ops.sloth calls).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace sloth {

inline void check_ce_online_block_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                                       const at::Tensor& acc) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "sloth.ce_online_block: logits must be a contiguous "
              "[rows, vb] tensor (it is updated in place)");
  const int64_t rows = logits.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == rows && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "sloth.ce_online_block: labels must be contiguous int64 [", rows, "]");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 2 && state.size(0) == rows &&
                  state.size(1) == 4,
              "sloth.ce_online_block: state must be contiguous fp32 [", rows, ", 4]");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.dim() == 2 && acc.size(0) == rows,
              "sloth.ce_online_block: acc must be contiguous fp32 [", rows, ", H]");
  for (const at::Tensor* t : {&labels, &state, &acc})
    TORCH_CHECK(t->device() == logits.device(), "sloth.ce_online_block: all tensors must be on ", logits.device());
}

// Checks the arguments; returns row_scale as a contiguous fp32 tensor (undefined when not given).
inline at::Tensor check_ce_online_finish_args(const at::Tensor& state, const at::Tensor& acc, const at::Tensor& weight,
                                              const at::Tensor& labels, const std::optional<at::Tensor>& row_scale,
                                              const at::Tensor& dh) {
  TORCH_CHECK(acc.dim() == 2, "sloth.ce_online_finish: acc must be [rows, H]");
  const int64_t rows = acc.size(0), H = acc.size(1);
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && state.scalar_type() == at::kFloat &&
                  state.is_contiguous() && state.numel() == 4 * rows,
              "sloth.ce_online_finish: state [rows, 4] and acc [rows, H] must be contiguous fp32");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H && weight.is_contiguous() && dh.is_contiguous() &&
                  dh.dim() == 2 && dh.size(0) == rows && dh.size(1) == H && dh.scalar_type() == weight.scalar_type(),
              "sloth.ce_online_finish: weight [V, H] and dh [rows, H] must be contiguous and of one dtype");
  TORCH_CHECK(labels.numel() == rows && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "sloth.ce_online_finish: labels must be contiguous int64 [", rows, "]");
  for (const at::Tensor* t : {&state, &weight, &labels, &dh})
    TORCH_CHECK(t->device() == acc.device(), "sloth.ce_online_finish: all tensors must be on ", acc.device());
  at::Tensor scale;
  if (row_scale) scale = row_scale->to(acc.device(), at::kFloat).contiguous();
  TORCH_CHECK(!scale.defined() || scale.numel() == rows, "sloth.ce_online_finish: row_scale must have ", rows,
              " entries");
  return scale;
}

}  // namespace sloth
