// CUDA registrations of the attention ops: argument checks, output allocation, strides, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/attention_checks.h"
#include "attention.h"
#include "check_launch.h"

namespace sloth::cuda {
namespace {

// The kernels read rows with 16-byte copies: last dim contiguous, other strides and the start 8-element aligned.
at::Tensor rows_ok(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = t.stride(d) % 8 == 0 || t.size(d) == 1;
  return ok ? t : t.contiguous();
}

AttnStrides strides_of(const at::Tensor& t, bool varlen) {
  AttnStrides s;
  if (varlen) {  // [tokens, heads, D]
    s.st = t.stride(0);
    s.sh = t.stride(1);
  } else {  // [B, S, heads, D]
    s.sb = t.stride(0);
    s.st = t.stride(1);
    s.sh = t.stride(2);
  }
  return s;
}

void common_args(AttnFwdArgs& a, const AttnShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& cu_q,
                 const std::optional<at::Tensor>& cu_k, double scale, bool causal, int64_t window, double softcap,
                 const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "sloth.", op,
              ": the GPU kernels take bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(s.D == 64 || s.D == 128 || s.D == 256, "sloth.", op, ": the GPU kernels support head_dim 64, 128, 256; got ",
              s.D);
  TORCH_CHECK(s.Sq < (int64_t{1} << 31) && s.Sk < (int64_t{1} << 31), "sloth.", op, ": sequences too long");
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_s = strides_of(q, s.varlen);
  a.k_s = strides_of(k, s.varlen);
  a.v_s = strides_of(v, s.varlen);
  a.cu_q = s.varlen ? cu_q->data_ptr<int>() : nullptr;
  a.cu_k = s.varlen ? cu_k->data_ptr<int>() : nullptr;
  a.sinks = sinks ? sinks->data_ptr<float>() : nullptr;
  a.B = (int)s.B;
  a.Hq = (int)s.Hq;
  a.Hkv = (int)s.Hkv;
  a.Sq = (int)s.Sq;
  a.Sk = (int)s.Sk;
  a.D = (int)s.D;
  a.scale = (float)scale;
  a.softcap = softcap > 0 ? (float)softcap : 0.f;
  a.window = window > 0 ? (int)window : 0;
  a.causal = causal;
  a.bf16 = q.scalar_type() == at::kBFloat16;
  if (s.varlen) {
    a.lse_sb = 0;
    a.lse_sh = s.Tq;
  } else {
    a.lse_sb = s.Hq * s.Sq;
    a.lse_sh = s.Sq;
  }
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                          const at::Tensor& v_, const std::optional<at::Tensor>& sinks_,
                                                          const std::optional<at::Tensor>& cu_q_,
                                                          const std::optional<at::Tensor>& cu_k_, int64_t max_seqlen_q,
                                                          int64_t max_seqlen_k, double scale, bool causal,
                                                          int64_t window, double softcap) {
  c10::cuda::CUDAGuard guard(q_.device());
  const AttnShape s = check_attention_args(q_, k_, v_, sinks_, cu_q_, cu_k_, max_seqlen_q, max_seqlen_k, window,
                                           "attention_forward");
  at::Tensor q = rows_ok(q_), k = rows_ok(k_), v = rows_ok(v_);
  std::optional<at::Tensor> sinks, cu_q, cu_k;
  if (sinks_) sinks = sinks_->contiguous();
  if (cu_q_) cu_q = cu_q_->contiguous(), cu_k = cu_k_->contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous
  at::Tensor lse = at::empty(attention_lse_shape(s), q.options().dtype(at::kFloat));
  AttnFwdArgs a;
  common_args(a, s, q, k, v, sinks, cu_q, cu_k, scale, causal, window, softcap, "attention_forward");
  a.out = out.data_ptr();
  a.o_s = strides_of(out, s.varlen);
  a.lse = lse.data_ptr<float>();
  check_launch(sloth::cuda::attention_forward(a, c10::cuda::getCurrentCUDAStream()), "attention_forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const std::optional<at::Tensor>& sinks_, const std::optional<at::Tensor>& cu_q_,
    const std::optional<at::Tensor>& cu_k_, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    int64_t window, double softcap) {
  c10::cuda::CUDAGuard guard(q_.device());
  const AttnShape s = check_attention_args(q_, k_, v_, sinks_, cu_q_, cu_k_, max_seqlen_q, max_seqlen_k, window,
                                           "attention_backward");
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes() && dout_.scalar_type() == q_.scalar_type() &&
                  out_.scalar_type() == q_.scalar_type(),
              "sloth.attention_backward: dout and out must match q in shape and dtype");
  TORCH_CHECK(lse_.scalar_type() == at::kFloat && lse_.sizes() == at::IntArrayRef(attention_lse_shape(s)),
              "sloth.attention_backward: lse must be float32 ", at::IntArrayRef(attention_lse_shape(s)));
  at::Tensor q = rows_ok(q_), k = rows_ok(k_), v = rows_ok(v_), out = rows_ok(out_), dout = rows_ok(dout_);
  at::Tensor lse = lse_.contiguous();
  std::optional<at::Tensor> sinks, cu_q, cu_k;
  if (sinks_) sinks = sinks_->contiguous();
  if (cu_q_) cu_q = cu_q_->contiguous(), cu_k = cu_k_->contiguous();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty_like(lse);
  at::Tensor dsinks = at::zeros({sinks ? s.Hq : 0}, q.options().dtype(at::kFloat));
  AttnBwdArgs a;
  common_args(a, s, q, k, v, sinks, cu_q, cu_k, scale, causal, window, softcap, "attention_backward");
  a.out = out.data_ptr();
  a.o_s = strides_of(out, s.varlen);
  a.lse = lse.data_ptr<float>();
  a.dout = dout.data_ptr();
  a.do_s = strides_of(dout, s.varlen);
  a.delta = delta.data_ptr<float>();
  a.dq_accum = dq_accum.data_ptr<float>();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.dk_s = strides_of(dk, s.varlen);
  a.dv_s = strides_of(dv, s.varlen);
  a.dsinks = sinks ? dsinks.data_ptr<float>() : nullptr;
  a.Tq = s.Tq;
  if (s.varlen) {
    // keys of tokens outside every document (none when cu_seqlens ends at the tensor's end) stay zero
    dk.zero_();
    dv.zero_();
  }
  check_launch(sloth::cuda::attention_backward(a, c10::cuda::getCurrentCUDAStream()), "attention_backward");
  return {dq_accum.to(q.scalar_type()), dk, dv, dsinks};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace sloth::cuda
