// CUDA registrations of the torch.ops.sloth ops (quantization, QLoRA GEMV, GLU, cross-entropy, RMSNorm, RoPE):
// argument checks (csrc/include/sloth/op_checks.h, shared with the CPU kernels), output allocation, the current
// stream, and the launch_* functions of launchers.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check_launch.h"
#include "launchers.h"
#include "sloth/mxfp4.h"
#include "sloth/op_checks.h"

namespace sloth::cuda {
namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// The launchers' view of a (checked) NF4 absmax: fp32, or double-quantized uint8 with its contiguous code2,
// absmax2 and offset (kept alive by the caller's tensors).
Nf4Absmax absmax_args(const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
                      const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                      int64_t blocksize2) {
  Nf4Absmax a;
  if (absmax.scalar_type() == at::kFloat) {
    a.absmax = absmax.data_ptr<float>();
    return a;
  }
  a.absmax_q = absmax.data_ptr<uint8_t>();
  a.code2 = code2->data_ptr<float>();
  a.absmax2 = absmax2->data_ptr<float>();
  a.offset = offset->data_ptr<float>();
  a.log2_blocksize2 = 0;
  while ((int64_t{1} << a.log2_blocksize2) < blocksize2) ++a.log2_blocksize2;
  return a;
}

// ---- NF4, blockwise 8-bit, MXFP4 ----

void dequantize_nf4_into(const at::Tensor& packed_, const at::Tensor& absmax_, int64_t blocksize,
                         const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                         const std::optional<at::Tensor>& offset, int64_t blocksize2, const at::Tensor& out,
                         const char* op) {
  at::Tensor packed = packed_.contiguous(), absmax = absmax_.contiguous();
  const auto c2 = contiguous(code2), a2 = contiguous(absmax2), off = contiguous(offset);
  check_launch(launch_nf4_dequantize(packed.data_ptr<uint8_t>(), absmax_args(absmax, c2, a2, off, blocksize2),
                                     out.numel(), (int)blocksize, out.data_ptr(), out_type_of(out.scalar_type()),
                                     stream()),
               op);
}

at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, at::IntArrayRef shape, int64_t blocksize,
                          at::ScalarType dtype, const std::optional<at::Tensor>& code2,
                          const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                          int64_t blocksize2) {
  c10::cuda::CUDAGuard guard(packed.device());
  check_nf4_dequantize_args(packed, absmax, checked_numel(shape, "nf4_dequantize"), blocksize, dtype, code2, absmax2,
                            offset, blocksize2, "nf4_dequantize");
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_nf4_into(packed, absmax, blocksize, code2, absmax2, offset, blocksize2, out, "nf4_dequantize");
  return out;
}

void nf4_dequantize_out(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                        const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                        const std::optional<at::Tensor>& offset, int64_t blocksize2, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(packed.device());
  TORCH_CHECK(out.is_contiguous(), "sloth.nf4_dequantize_out: out must be contiguous");
  check_device(out, packed, "nf4_dequantize_out", "out");
  check_nf4_dequantize_args(packed, absmax, out.numel(), blocksize, out.scalar_type(), code2, absmax2, offset,
                            blocksize2, "nf4_dequantize_out");
  dequantize_nf4_into(packed, absmax, blocksize, code2, absmax2, offset, blocksize2, out, "nf4_dequantize_out");
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& x_, int64_t blocksize) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_float(x_, "nf4_quantize", "x");
  check_nf4_blocksize(blocksize, "nf4_quantize");
  at::Tensor x = x_.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  check_launch(launch_nf4_quantize(x.data_ptr(), out_type_of(x.scalar_type()), n, (int)blocksize,
                                   packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), stream()),
               "nf4_quantize");
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize(const at::Tensor& x_, const at::Tensor& code_,
                                                       int64_t blocksize) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_blockwise8_args(x_, code_, blocksize);
  at::Tensor x = x_.contiguous(), code = code_.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  check_launch(launch_blockwise8_quantize(x.data_ptr(), out_type_of(x.scalar_type()), n, code.data_ptr<float>(),
                                          (int)blocksize, q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), stream()),
               "blockwise8_quantize");
  return {q, absmax};
}

std::tuple<at::Tensor, at::Tensor> mxfp4_quantize(const at::Tensor& x_) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_mxfp4_quantize_args(x_, kMxBlock);
  at::Tensor x = x_.contiguous();
  std::vector<int64_t> sshape(x.sizes().begin(), x.sizes().end() - 1);
  sshape.push_back(x.size(-1) / kMxBlock);
  std::vector<int64_t> bshape = sshape;
  bshape.push_back(kMxBlock / 2);
  at::Tensor blocks = at::empty(bshape, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(sshape, x.options().dtype(at::kByte));
  check_launch(launch_mxfp4_quantize(x.data_ptr(), out_type_of(x.scalar_type()), scales.numel(),
                                     blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), stream()),
               "mxfp4_quantize");
  return {blocks, scales};
}

at::Tensor mxfp4_dequantize(const at::Tensor& blocks_, const at::Tensor& scales_, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(blocks_.device());
  check_mxfp4_dequantize_args(blocks_, scales_, dtype, kMxBlock);
  at::Tensor blocks = blocks_.contiguous(), scales = scales_.contiguous();
  if (reinterpret_cast<uintptr_t>(blocks.data_ptr()) % 4 != 0) blocks = blocks.clone();  // 4-byte loads
  std::vector<int64_t> oshape(blocks.sizes().begin(), blocks.sizes().end() - 2);
  oshape.push_back(blocks.size(-2) * kMxBlock);
  at::Tensor out = at::empty(oshape, blocks.options().dtype(dtype));
  check_launch(launch_mxfp4_dequantize(blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), scales.numel(),
                                       out.data_ptr(), out_type_of(dtype), stream()),
               "mxfp4_dequantize");
  return out;
}

// ---- QLoRA GEMV and GLU ----

at::Tensor nf4_gemv_lora(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& absmax_,
                         int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& code2,
                         const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                         int64_t blocksize2, const std::optional<at::Tensor>& lora_t,
                         const std::optional<at::Tensor>& lora_B, double scaling, const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_nf4_gemv_lora_args(x_, packed_, absmax_, out_features, blocksize, code2, absmax2, offset, blocksize2, lora_t,
                           lora_B, bias);
  const int64_t m = x_.size(0), k = x_.size(1);
  const OutType type = out_type_of(x_.scalar_type());
  TORCH_CHECK(nf4_gemv_supported((int)std::min<int64_t>(m, 1 << 20), k, type), "sloth.nf4_gemv_lora: needs "
              "1 <= M <= 16, K % 32 == 0, 0 < K < 2^30 and bf16/fp16 x on an NVIDIA GPU; got x ", x_.sizes(), " ",
              x_.scalar_type(), ". Use the dequantize + matmul path (sloth.lora_linear picks it for you)");
  at::Tensor x = x_.contiguous(), packed = packed_.contiguous(), absmax = absmax_.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) x = x.clone();
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0) packed = packed.clone();
  const auto c2 = contiguous(code2), a2 = contiguous(absmax2), off = contiguous(offset);
  at::Tensor y = at::empty({m, out_features}, x.options());
  Nf4GemvArgs args;
  args.x = x.data_ptr();
  args.packed = packed.data_ptr<uint8_t>();
  args.absmax = absmax_args(absmax, c2, a2, off, blocksize2);
  args.blocksize = (int)blocksize;
  at::Tensor t, b, bs;
  if (lora_t) {
    t = lora_t->to(x.scalar_type()).contiguous();  // [M, r]
    b = lora_B->to(x.scalar_type()).contiguous();  // [N, r]
    args.lora_t = t.data_ptr();
    args.lora_B = b.data_ptr();
    args.rank = (int)t.size(1);
    args.scaling = (float)scaling;
  }
  if (bias) {
    bs = bias->to(x.scalar_type()).contiguous();
    args.bias = bs.data_ptr();
  }
  args.y = y.data_ptr();
  args.m = (int)m;
  args.n = out_features;
  args.k = k;
  check_launch(launch_nf4_gemv_lora(args, type, stream()), "nf4_gemv_lora");
  return y;
}

at::Tensor glu_forward(const at::Tensor& gate_, const at::Tensor& up_, int64_t kind) {
  c10::cuda::CUDAGuard guard(gate_.device());
  check_glu_forward_args(gate_, up_, kind);
  at::Tensor gate = gate_.contiguous(), up = up_.contiguous();
  at::Tensor out = at::empty_like(gate);
  check_launch(launch_glu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                  out_type_of(gate.scalar_type()), (int)kind, stream()),
               "glu_forward");
  return out;
}

void glu_backward(const at::Tensor& grad_, const at::Tensor& gate, const at::Tensor& up, int64_t kind) {
  c10::cuda::CUDAGuard guard(gate.device());
  check_glu_backward_args(grad_, gate, up, kind);
  at::Tensor grad = grad_.contiguous();
  check_launch(launch_glu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), gate.numel(),
                                   out_type_of(gate.scalar_type()), (int)kind, stream()),
               "glu_backward");
}

// ---- chunked and online linear cross-entropy ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_chunk(
    at::Tensor& logits, const at::Tensor& labels_, const std::optional<at::Tensor>& grad_nll_,
    const std::optional<at::Tensor>& grad_entropy_, double grad_scale, int64_t ignore_index, double softcap,
    double logit_scale, bool compute_grad) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_cross_entropy_chunk_args(logits, labels_, grad_nll_, grad_entropy_);
  const int64_t rows = logits.size(0), V = logits.size(1);
  at::Tensor labels = labels_.to(at::kLong).contiguous();
  at::Tensor grad_nll, grad_entropy;
  if (grad_nll_) grad_nll = grad_nll_->to(at::kFloat).contiguous();
  if (grad_entropy_) grad_entropy = grad_entropy_->to(at::kFloat).contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32), entropy = at::empty({rows}, f32);
  CeChunkArgs a;
  a.labels = labels.data_ptr<int64_t>();
  a.grad_nll = grad_nll.defined() ? grad_nll.data_ptr<float>() : nullptr;
  a.grad_entropy = grad_entropy.defined() ? grad_entropy.data_ptr<float>() : nullptr;
  a.grad_scale = (float)grad_scale;
  a.softcap = (float)softcap;
  a.logit_scale = (float)logit_scale;
  a.ignore_index = ignore_index;
  a.compute_grad = compute_grad;
  a.loss = loss.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.entropy = entropy.data_ptr<float>();
  check_launch(launch_cross_entropy_chunk(logits.data_ptr(), out_type_of(logits.scalar_type()), rows, V, a, stream()),
               "cross_entropy_chunk");
  return {loss, lse, entropy};
}

void ce_online_block(at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, at::Tensor& state,
                     at::Tensor& acc, double softcap, double logit_scale, double margin) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_ce_online_block_args(logits, labels, state, acc);
  CeOnlineBlockArgs a;
  a.labels = labels.data_ptr<int64_t>();
  a.vocab_start = vocab_start;
  a.state = state.data_ptr<float>();
  a.acc = acc.data_ptr<float>();
  a.H = acc.size(1);
  a.softcap = (float)softcap;
  a.logit_scale = (float)logit_scale;
  a.margin = (float)margin;
  check_launch(launch_ce_online_block(logits.data_ptr(), out_type_of(logits.scalar_type()), logits.size(0),
                                      logits.size(1), a, stream()),
               "ce_online_block");
}

at::Tensor ce_online_finish(const at::Tensor& state, const at::Tensor& acc, const at::Tensor& weight,
                            const at::Tensor& labels, const std::optional<at::Tensor>& row_scale_, int64_t ignore_index,
                            at::Tensor& dh) {
  c10::cuda::CUDAGuard guard(acc.device());
  const at::Tensor row_scale = check_ce_online_finish_args(state, acc, weight, labels, row_scale_, dh);
  const int64_t rows = acc.size(0);
  at::Tensor loss = at::empty({rows}, acc.options());
  CeOnlineFinishArgs a;
  a.row_scale = row_scale.defined() ? row_scale.data_ptr<float>() : nullptr;
  a.state = state.data_ptr<float>();
  a.acc = acc.data_ptr<float>();
  a.labels = labels.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.V = weight.size(0);
  a.H = acc.size(1);
  a.loss = loss.data_ptr<float>();
  check_launch(launch_ce_online_finish(weight.data_ptr(), dh.data_ptr(), out_type_of(weight.scalar_type()), rows, a,
                                       stream()),
               "ce_online_finish");
  return loss;
}

// ---- RMSNorm and RoPE ----

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_, const at::Tensor& w_, double eps,
                                                    double offset, bool cast_before_weight) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_norm_args(x_, w_, "rms_norm_forward");
  at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(launch_rms_norm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), x.size(0),
                                       x.size(1), out_type_of(x.scalar_type()), (float)eps, (float)offset,
                                       cast_before_weight, stream()),
               "rms_norm_forward");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_,
                                                     const at::Tensor& rstd_, double offset, bool cast_before_weight,
                                                     bool compute_dw) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_rms_norm_backward_args(dy_, x_, w_, rstd_);
  at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous(), rstd = rstd_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor dx = at::empty_like(x);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({compute_dw ? H : 0}, f32);
  const int nparts = rms_norm_backward_parts(rows);
  at::Tensor partial = compute_dw ? at::empty({nparts, H}, f32) : at::Tensor();
  check_launch(launch_rms_norm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(),
                                        dx.data_ptr(), compute_dw ? dw.data_ptr<float>() : nullptr,
                                        compute_dw ? partial.data_ptr<float>() : nullptr, nparts, rows, H,
                                        out_type_of(x.scalar_type()), (float)offset, cast_before_weight, stream()),
               "rms_norm_backward");
  return {dx, dw};
}

// RoPE of src [tokens, heads, D] into dst (dst may be src) with cos / sin [tokens, rot_dim] fp32 contiguous.
void rotate(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
            const char* op) {
  RopeLayout l;
  l.src = src.data_ptr();
  l.src_t = src.stride(0), l.src_h = src.stride(1);
  l.dst = dst.data_ptr();
  l.dst_t = dst.stride(0), l.dst_h = dst.stride(1);
  l.cos = cos.data_ptr<float>();
  l.sin = sin.data_ptr<float>();
  l.tokens = src.size(0), l.heads = src.size(1), l.rot_dim = cos.size(1);
  check_launch(launch_rope(l, out_type_of(src.scalar_type()), inverse, stream()), op);
}

void rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_, const at::Tensor& sin_, bool inverse) {
  c10::cuda::CUDAGuard guard(q.device());
  check_rope_args(q, k, cos_, sin_, /*in_place=*/true);
  at::Tensor cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  rotate(q, q, cos, sin, inverse, "rope_");
  rotate(k, k, cos, sin, inverse, "rope_");
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_,
                                        const at::Tensor& sin_, bool inverse) {
  c10::cuda::CUDAGuard guard(q.device());
  check_rope_args(q, k, cos_, sin_, /*in_place=*/false);
  at::Tensor cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  at::Tensor qo = rope_output(q, cos.size(1)), ko = rope_output(k, cos.size(1));
  rotate(q, qo, cos, sin, inverse, "rope");
  rotate(k, ko, cos, sin, inverse, "rope");
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("nf4_dequantize", &nf4_dequantize);
  m.impl("nf4_dequantize_out", &nf4_dequantize_out);
  m.impl("blockwise8_quantize", &blockwise8_quantize);
  m.impl("mxfp4_quantize", &mxfp4_quantize);
  m.impl("mxfp4_dequantize", &mxfp4_dequantize);
  m.impl("nf4_gemv_lora", &nf4_gemv_lora);
  m.impl("glu_forward", &glu_forward);
  m.impl("glu_backward", &glu_backward);
  m.impl("cross_entropy_chunk", &cross_entropy_chunk);
  m.impl("ce_online_block", &ce_online_block);
  m.impl("ce_online_finish", &ce_online_finish);
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("rope_", &rope_);
  m.impl("rope", &rope);
}

}  // namespace sloth::cuda
