// Argument checks of the RMSNorm and RoPE ops, shared by the CPU kernels and the CUDA / HIP bindings (the
// Python wrappers in python/sloth/ops/norm_rope.py check first, with friendlier errors; these guard direct
// torch.ops.sloth calls).
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

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

// rope_ (in_place) rotates q and k where they are; rope writes new tensors and only reads them.
inline void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                            bool in_place) {
  const char* op = in_place ? "sloth.rope_" : "sloth.rope";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, op, ": q and k must be [tokens, heads, D], got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " must share tokens and head_dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(), op,
              ": q and k must have one dtype and device");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, op, ": the last dim of q and k must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0), op,
              ": cos and sin must be [tokens, rot_dim] with tokens = ", q.size(0), ", got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(cos.device() == q.device() && sin.device() == q.device(), op, ": cos and sin must be on ", q.device());
  TORCH_CHECK(at::isFloatingType(cos.scalar_type()) && at::isFloatingType(sin.scalar_type()), op,
              ": cos and sin must be floating point");
  TORCH_CHECK(cos.size(1) % 2 == 0 && cos.size(1) <= q.size(2), op, ": rot_dim ", cos.size(1),
              " must be even and <= head_dim ", q.size(2));
  if (in_place) {
    const auto overlap = at::get_overlap_status(q, k);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                ": q and k share memory (they would be rotated twice); pass distinct tensors");
    TORCH_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes && at::has_internal_overlap(k) != at::MemOverlap::Yes,
                op, ": q and k are written in place and must not overlap themselves (e.g. an expand()ed tensor)");
  }
}

// The output of rope for x [tokens, heads, D]: contiguous, with the dims past rot_dim copied from x (the kernels
// write the first rot_dim).
inline at::Tensor rope_output(const at::Tensor& x, int64_t rot_dim) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (rot_dim < x.size(2)) out.narrow(2, rot_dim, x.size(2) - rot_dim).copy_(x.narrow(2, rot_dim, x.size(2) - rot_dim));
  return out;
}

}  // namespace sloth
