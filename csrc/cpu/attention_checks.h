// Argument checks and shapes of the attention ops, shared by the CPU kernel and the CUDA / HIP bindings (the
// Python wrapper in python/sloth/ops/attention.py checks first, with friendlier errors and the cu_seqlens
// values; these guard direct torch.ops.sloth calls).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace sloth {

// The problem, whatever the layout: dense q [B, Sq, Hq, D] / k, v [B, Sk, Hkv, D], or packed q [Tq, Hq, D] /
// k, v [Tk, Hkv, D] with cu_seqlens_q / cu_seqlens_k [B + 1] int32.
struct AttnShape {
  bool varlen = false;
  int64_t B = 0, Sq = 0, Sk = 0;  // dense: batch and lengths; varlen: documents and max lengths
  int64_t Tq = 0, Tk = 0;         // varlen: tokens
  int64_t Hq = 0, Hkv = 0, D = 0;
};

inline AttnShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& sinks,
                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                      const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, int64_t window, const char* op) {
  AttnShape s;
  s.varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), "sloth.", op,
              ": pass both cu_seqlens_q and cu_seqlens_k, or neither");
  const int64_t nd = s.varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == nd && k.dim() == nd && v.dim() == nd, "sloth.", op, ": q, k, v must be ",
              s.varlen ? "[tokens, heads, D] with cu_seqlens" : "[batch, seq, heads, D]", ", got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "sloth.", op,
              ": q, k, v must have one dtype");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "sloth.", op, ": q, k, v must be on one device");
  TORCH_CHECK(k.sizes() == v.sizes(), "sloth.", op, ": k ", k.sizes(), " and v ", v.sizes(), " must have one shape");
  s.D = q.size(-1);
  s.Hq = q.size(-2);
  s.Hkv = k.size(-2);
  TORCH_CHECK(k.size(-1) == s.D, "sloth.", op, ": q and k must have one head_dim");
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "sloth.", op, ": q_heads (", s.Hq, ") must be a multiple of kv_heads (",
              s.Hkv, ")");
  TORCH_CHECK(window == -1 || window > 0, "sloth.", op, ": window must be > 0 (or -1 for none), got ", window);
  if (s.varlen) {
    for (const at::Tensor* c : {&*cu_seqlens_q, &*cu_seqlens_k}) {
      TORCH_CHECK(c->dim() == 1 && c->numel() >= 2 && c->scalar_type() == at::kInt && c->device() == q.device(),
                  "sloth.", op, ": cu_seqlens must be 1-D int32 [documents + 1] on q's device");
    }
    TORCH_CHECK(cu_seqlens_q->numel() == cu_seqlens_k->numel(), "sloth.", op,
                ": cu_seqlens_q and cu_seqlens_k must have one length");
    s.B = cu_seqlens_q->numel() - 1;
    s.Tq = q.size(0);
    s.Tk = k.size(0);
    s.Sq = max_seqlen_q;
    s.Sk = max_seqlen_k;
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "sloth.", op, ": max_seqlen must be >= 0");
  } else {
    TORCH_CHECK(q.size(0) == k.size(0), "sloth.", op, ": q and k must have one batch size");
    s.B = q.size(0);
    s.Sq = q.size(1);
    s.Sk = k.size(1);
    s.Tq = s.B * s.Sq;
    s.Tk = s.B * s.Sk;
  }
  if (sinks) {
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == s.Hq && sinks->scalar_type() == at::kFloat &&
                    sinks->device() == q.device(),
                "sloth.", op, ": sinks must be float32 [q_heads] = [", s.Hq, "] on q's device, got ", sinks->sizes(),
                " ", sinks->scalar_type());
  }
  return s;
}

// lse's shape: dense [B, Hq, Sq], packed [Hq, Tq].
inline std::vector<int64_t> attention_lse_shape(const AttnShape& s) {
  if (s.varlen) return {s.Hq, s.Tq};
  return {s.B, s.Hq, s.Sq};
}

}  // namespace sloth
