// Argument checks of the RMSNorm and RoPE ops, shared by the CPU kernels and the CUDA / HIP bindings (the
// Python wrappers in python/sloth/ops/norm_rope.py check first, with friendlier errors; these guard direct
// torch.ops.sloth calls).
#pragma once
#include <ATen/ATen.h>

namespace sloth {

inline void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2, "sloth.", op, ": x must be [rows, H], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "sloth.", op, ": weight must be [", x.size(1),
              "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "sloth.", op, ": weight and x must have one dtype, got ",
              weight.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "sloth.", op, ": weight and x must be on one device");
}

inline void check_rms_norm_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& rstd) {
  check_norm_args(x, weight, "rms_norm_backward");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "sloth.rms_norm_backward: dy must match x in shape and dtype");
  TORCH_CHECK(rstd.numel() == x.size(0) && rstd.scalar_type() == at::kFloat,
              "sloth.rms_norm_backward: rstd must be [rows] float32");
}

inline void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "sloth.rope_: q and k must be [tokens, heads, D]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "sloth.rope_: q ", q.sizes(), " and k ", k.sizes(),
              " must share tokens and head_dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(),
              "sloth.rope_: q and k must have one dtype and device");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "sloth.rope_: the last dim of q and k must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0),
              "sloth.rope_: cos and sin must be [tokens, rot_dim]");
  TORCH_CHECK(cos.size(1) % 2 == 0 && cos.size(1) <= q.size(2), "sloth.rope_: rot_dim must be even and <= head_dim");
}

}  // namespace sloth
