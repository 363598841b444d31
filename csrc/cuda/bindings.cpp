// CUDA kernel registrations for torch.ops.sloth: argument checks, output allocation, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/dtype_dispatch.h"
#include "../cpu/linear_ce_online_checks.h"
#include "../cpu/norm_rope_checks.h"
#include "launchers.h"
#include "sloth/mxfp4.h"

namespace sloth::cuda {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "sloth.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err),
              ". If this says 'no kernel image is available', this build does not carry your GPU's "
              "architecture: see `sloth info` and rebuild with SLOTH_CUDA_ARCHS set to include it.");
}

Nf4Absmax absmax_args(const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
                      const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                      int64_t blocksize2) {
  Nf4Absmax a;
  if (absmax.scalar_type() == at::kFloat) {
    a.absmax = absmax.data_ptr<float>();
  } else {
    TORCH_CHECK(code2 && absmax2 && offset, "sloth.nf4_dequantize: uint8 absmax needs code2, absmax2, offset");
    a.absmax_q = absmax.data_ptr<uint8_t>();
    a.code2 = code2->data_ptr<float>();
    a.absmax2 = absmax2->data_ptr<float>();
    a.offset = offset->data_ptr<float>();
    TORCH_CHECK(blocksize2 > 0 && (blocksize2 & (blocksize2 - 1)) == 0,
                "sloth: blocksize2 (absmax blocks per absmax2 entry) must be a power of two, got ", blocksize2);
    while ((int64_t{1} << a.log2_blocksize2) < blocksize2) ++a.log2_blocksize2;
    while ((int64_t{1} << a.log2_blocksize2) > blocksize2) --a.log2_blocksize2;
  }
  return a;
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed_, const at::Tensor& absmax_, at::IntArrayRef shape,
                          int64_t blocksize, at::ScalarType dtype, const std::optional<at::Tensor>& code2,
                          const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                          int64_t blocksize2) {
  c10::cuda::CUDAGuard guard(packed_.device());
  at::Tensor packed = packed_.contiguous(), absmax = absmax_.contiguous();
  std::optional<at::Tensor> c2, a2, off;
  if (code2) c2 = code2->contiguous();
  if (absmax2) a2 = absmax2->contiguous();
  if (offset) off = offset->contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  check_launch(sloth::cuda::nf4_dequantize(packed.data_ptr<uint8_t>(), absmax_args(absmax, c2, a2, off, blocksize2),
                                           out.numel(), (int)blocksize, out.data_ptr(), out_type_of(dtype),
                                           c10::cuda::getCurrentCUDAStream()),
               "nf4_dequantize");
  return out;
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& x_, int64_t blocksize) {
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  check_launch(sloth::cuda::nf4_quantize(x.data_ptr(), out_type_of(x.scalar_type()), n, (int)blocksize,
                                         packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream()),
               "nf4_quantize");
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cuda(const at::Tensor& x_, const at::Tensor& code_,
                                                       int64_t blocksize) {
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous(), code = code_.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  check_launch(sloth::cuda::blockwise8_quantize(x.data_ptr(), out_type_of(x.scalar_type()), n, code.data_ptr<float>(),
                                                (int)blocksize, q.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                                c10::cuda::getCurrentCUDAStream()),
               "blockwise8_quantize");
  return {q, absmax};
}

std::tuple<at::Tensor, at::Tensor> mxfp4_quantize_cuda(const at::Tensor& x_) {
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous();
  const int64_t k = x.size(-1);
  std::vector<int64_t> sshape(x.sizes().begin(), x.sizes().end() - 1);
  sshape.push_back(k / kMxBlock);
  std::vector<int64_t> bshape = sshape;
  bshape.push_back(kMxBlock / 2);
  at::Tensor blocks = at::empty(bshape, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(sshape, x.options().dtype(at::kByte));
  check_launch(sloth::cuda::mxfp4_quantize(x.data_ptr(), out_type_of(x.scalar_type()), scales.numel(),
                                           blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
                                           c10::cuda::getCurrentCUDAStream()),
               "mxfp4_quantize");
  return {blocks, scales};
}

at::Tensor mxfp4_dequantize_cuda(const at::Tensor& blocks_, const at::Tensor& scales_, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(blocks_.device());
  at::Tensor blocks = blocks_.contiguous(), scales = scales_.contiguous();
  if (reinterpret_cast<uintptr_t>(blocks.data_ptr()) % 4 != 0) blocks = blocks.clone();  // 4-byte loads
  std::vector<int64_t> oshape(blocks.sizes().begin(), blocks.sizes().end() - 2);
  oshape.push_back(blocks.size(-2) * kMxBlock);
  at::Tensor out = at::empty(oshape, blocks.options().dtype(dtype));
  check_launch(sloth::cuda::mxfp4_dequantize(blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), scales.numel(),
                                             out.data_ptr(), out_type_of(dtype), c10::cuda::getCurrentCUDAStream()),
               "mxfp4_dequantize");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("blockwise8_quantize", &blockwise8_quantize_cuda);
  m.impl("mxfp4_quantize", &mxfp4_quantize_cuda);
  m.impl("mxfp4_dequantize", &mxfp4_dequantize_cuda);
}

}  // namespace sloth::cuda

// ---- QLoRA linear and fused GLU (branch qlora); bindings named apart from the launchers (*_cuda) ----
namespace sloth::cuda {
namespace {

void nf4_dequantize_out_cuda(const at::Tensor& packed_, const at::Tensor& absmax_, int64_t blocksize,
                        const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                        const std::optional<at::Tensor>& offset, int64_t blocksize2, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(packed_.device());
  TORCH_CHECK(out.is_cuda() && out.device() == packed_.device(), "sloth.nf4_dequantize_out: out must be on ",
              packed_.device());
  TORCH_CHECK(out.is_contiguous(), "sloth.nf4_dequantize_out: out must be contiguous");
  TORCH_CHECK(packed_.numel() == (out.numel() + 1) / 2, "sloth.nf4_dequantize_out: packed holds ", packed_.numel(),
              " bytes but out has ", out.numel(), " elements");
  at::Tensor packed = packed_.contiguous(), absmax = absmax_.contiguous();
  std::optional<at::Tensor> c2, a2, off;
  if (code2) c2 = code2->contiguous();
  if (absmax2) a2 = absmax2->contiguous();
  if (offset) off = offset->contiguous();
  check_launch(sloth::cuda::nf4_dequantize(packed.data_ptr<uint8_t>(), absmax_args(absmax, c2, a2, off, blocksize2),
                                           out.numel(), (int)blocksize, out.data_ptr(),
                                           out_type_of(out.scalar_type()), at::cuda::getCurrentCUDAStream()),
               "nf4_dequantize_out");
}

at::Tensor nf4_gemv_lora_cuda(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& absmax_,
                         int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& code2,
                         const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                         int64_t blocksize2, const std::optional<at::Tensor>& lora_t,
                         const std::optional<at::Tensor>& lora_B, double scaling, const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard guard(x_.device());
  TORCH_CHECK(x_.dim() == 2, "sloth.nf4_gemv_lora: x must be [M, K], got ", x_.sizes());
  const int64_t m = x_.size(0), k = x_.size(1);
  const OutType type = out_type_of(x_.scalar_type());
  TORCH_CHECK(sloth::cuda::nf4_gemv_supported((int)m, k, type), "sloth.nf4_gemv_lora: needs 1 <= M <= 16, "
              "K % 32 == 0, K < 2^30 and bf16/fp16 x on an NVIDIA GPU; got x ", x_.sizes(), " ", x_.scalar_type(),
              ". Use the dequantize + matmul path (sloth.lora_linear picks it for you)");
  TORCH_CHECK(packed_.numel() == (out_features * k + 1) / 2, "sloth.nf4_gemv_lora: packed holds ", packed_.numel(),
              " bytes, expected ", (out_features * k + 1) / 2, " for a [", out_features, ", ", k, "] weight");
  at::Tensor x = x_.contiguous(), packed = packed_.contiguous(), absmax = absmax_.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) x = x.clone();
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0) packed = packed.clone();
  std::optional<at::Tensor> c2, a2, off;
  if (code2) c2 = code2->contiguous();
  if (absmax2) a2 = absmax2->contiguous();
  if (offset) off = offset->contiguous();
  at::Tensor y = at::empty({m, out_features}, x.options());
  Nf4GemvArgs args;
  args.x = x.data_ptr();
  args.packed = packed.data_ptr<uint8_t>();
  args.absmax = absmax_args(absmax, c2, a2, off, blocksize2);
  args.blocksize = (int)blocksize;
  at::Tensor t, b, bs;
  if (lora_t && lora_B) {
    t = lora_t->to(x.scalar_type()).contiguous();
    b = lora_B->to(x.scalar_type()).contiguous();
    TORCH_CHECK(t.dim() == 2 && b.dim() == 2 && t.size(0) == m && b.size(0) == out_features && t.size(1) == b.size(1),
                "sloth.nf4_gemv_lora: lora_t must be [M, r] and lora_B [N, r]; got ", t.sizes(), " and ", b.sizes());
    args.lora_t = t.data_ptr();
    args.lora_B = b.data_ptr();
    args.rank = (int)t.size(1);
    args.scaling = (float)scaling;
  }
  if (bias) {
    bs = bias->to(x.scalar_type()).contiguous();
    TORCH_CHECK(bs.numel() == out_features, "sloth.nf4_gemv_lora: bias must have ", out_features, " entries");
    args.bias = bs.data_ptr();
  }
  args.y = y.data_ptr();
  args.m = (int)m;
  args.n = out_features;
  args.k = k;
  check_launch(sloth::cuda::nf4_gemv_lora(args, type, at::cuda::getCurrentCUDAStream()), "nf4_gemv_lora");
  return y;
}

void check_glu_pair(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), "sloth.", op, ": ", an, " ", a.sizes(), " and ", bn, " ", b.sizes(),
              " must have the same shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sloth.", op, ": ", an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "sloth.", op, ": ", an, " and ", bn, " must be on one device");
}

at::Tensor glu_forward_cuda(const at::Tensor& gate_, const at::Tensor& up_, int64_t kind) {
  c10::cuda::CUDAGuard guard(gate_.device());
  check_glu_pair(gate_, up_, "gate", "up", "glu_forward");
  TORCH_CHECK(kind >= 0 && kind <= 2, "sloth.glu_forward: kind must be 0, 1 or 2, got ", kind);
  at::Tensor gate = gate_.contiguous(), up = up_.contiguous();
  at::Tensor out = at::empty_like(gate);
  check_launch(sloth::cuda::glu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                        out_type_of(gate.scalar_type()), (int)kind, at::cuda::getCurrentCUDAStream()),
               "glu_forward");
  return out;
}

void glu_backward_cuda(const at::Tensor& grad_, const at::Tensor& gate, const at::Tensor& up, int64_t kind) {
  c10::cuda::CUDAGuard guard(gate.device());
  check_glu_pair(gate, up, "gate", "up", "glu_backward");
  check_glu_pair(grad_, gate, "grad", "gate", "glu_backward");
  TORCH_CHECK(kind >= 0 && kind <= 2, "sloth.glu_backward: kind must be 0, 1 or 2, got ", kind);
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(),
              "sloth.glu_backward: gate and up are written in place and must be contiguous");
  at::Tensor grad = grad_.contiguous();
  check_launch(sloth::cuda::glu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), gate.numel(),
                                         out_type_of(gate.scalar_type()), (int)kind, at::cuda::getCurrentCUDAStream()),
               "glu_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CUDA, m) {
  m.impl("nf4_dequantize_out", &nf4_dequantize_out_cuda);
  m.impl("nf4_gemv_lora", &nf4_gemv_lora_cuda);
  m.impl("glu_forward", &glu_forward_cuda);
  m.impl("glu_backward", &glu_backward_cuda);
}

}  // namespace sloth::cuda

// ---- chunked linear cross-entropy (branch ce) ----
namespace sloth::cuda {
namespace {

// Named apart from the launcher sloth::cuda::cross_entropy_chunk so that &fn below is not an overload set.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_chunk_cuda(
    at::Tensor& logits, const at::Tensor& labels_, const std::optional<at::Tensor>& grad_nll_,
    const std::optional<at::Tensor>& grad_entropy_, double grad_scale, int64_t ignore_index, double softcap,
    double logit_scale, bool compute_grad) {
  c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "sloth.cross_entropy_chunk: logits must be a contiguous "
              "[rows, V] tensor (it is updated in place)");
  const int64_t rows = logits.size(0), V = logits.size(1);
  at::Tensor labels = labels_.to(logits.device(), at::kLong).contiguous();
  TORCH_CHECK(labels.numel() == rows, "sloth.cross_entropy_chunk: labels must have ", rows, " entries");
  at::Tensor grad_nll, grad_entropy;
  if (grad_nll_) grad_nll = grad_nll_->to(logits.device(), at::kFloat).contiguous();
  if (grad_entropy_) grad_entropy = grad_entropy_->to(logits.device(), at::kFloat).contiguous();
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
  check_launch(sloth::cuda::cross_entropy_chunk(logits.data_ptr(), out_type_of(logits.scalar_type()), rows, V, a,
                                                at::cuda::getCurrentCUDAStream()),
               "cross_entropy_chunk");
  return {loss, lse, entropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CUDA, m) { m.impl("cross_entropy_chunk", &cross_entropy_chunk_cuda); }

}  // namespace sloth::cuda

// ---- RMSNorm and RoPE (branch integrate); bindings named apart from the launchers (*_cuda) ----
namespace sloth::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cuda(const at::Tensor& x_, const at::Tensor& w_, double eps,
                                                         double offset, bool cast_before_weight) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_norm_args(x_, w_, "rms_norm_forward");
  at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(sloth::cuda::rms_norm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(),
                                             x.size(0), x.size(1), out_type_of(x.scalar_type()), (float)eps,
                                             (float)offset, cast_before_weight, at::cuda::getCurrentCUDAStream()),
               "rms_norm_forward");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& dy_, const at::Tensor& x_,
                                                          const at::Tensor& w_, const at::Tensor& rstd_,
                                                          double offset, bool cast_before_weight, bool compute_dw) {
  c10::cuda::CUDAGuard guard(x_.device());
  check_rms_norm_backward_args(dy_, x_, w_, rstd_);
  at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous(), rstd = rstd_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor dx = at::empty_like(x);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({compute_dw ? H : 0}, f32);
  const int nparts = sloth::cuda::rms_norm_backward_parts(rows);
  at::Tensor partial = compute_dw ? at::empty({nparts, H}, f32) : at::Tensor();
  check_launch(sloth::cuda::rms_norm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(),
                                              dx.data_ptr(), compute_dw ? dw.data_ptr<float>() : nullptr,
                                              compute_dw ? partial.data_ptr<float>() : nullptr, nparts, rows, H,
                                              out_type_of(x.scalar_type()), (float)offset, cast_before_weight,
                                              at::cuda::getCurrentCUDAStream()),
               "rms_norm_backward");
  return {dx, dw};
}

// RoPE of src [tokens, heads, D] into dst (dst may be src) with cos / sin [tokens, rot_dim] fp32 contiguous.
void rotate(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
            bool inverse, const char* op) {
  RopeLayout l;
  l.src = src.data_ptr();
  l.src_t = src.stride(0), l.src_h = src.stride(1);
  l.dst = dst.data_ptr();
  l.dst_t = dst.stride(0), l.dst_h = dst.stride(1);
  l.cos = cos.data_ptr<float>();
  l.sin = sin.data_ptr<float>();
  l.tokens = src.size(0), l.heads = src.size(1), l.rot_dim = cos.size(1);
  check_launch(launch_rope(l, out_type_of(src.scalar_type()), inverse, at::cuda::getCurrentCUDAStream()), op);
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
  m.impl("rms_norm_forward", &rms_norm_forward_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("rope_", &rope_);
  m.impl("rope", &rope);
}

}  // namespace sloth::cuda

// ---- online linear cross-entropy for a frozen head (linear_ce_online.cu) ----
namespace sloth::cuda {
namespace {

void ce_online_block_cuda(at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, at::Tensor& state,
                          at::Tensor& acc, double softcap, double logit_scale, double margin) {
  c10::cuda::CUDAGuard guard(logits.device());
  check_ce_online_block_args(logits, labels, state, acc);
  const int64_t rows = logits.size(0);
  CeOnlineBlockArgs a;
  a.labels = labels.data_ptr<int64_t>();
  a.vocab_start = vocab_start;
  a.state = state.data_ptr<float>();
  a.acc = acc.data_ptr<float>();
  a.H = acc.size(1);
  a.softcap = (float)softcap;
  a.logit_scale = (float)logit_scale;
  a.margin = (float)margin;
  check_launch(sloth::cuda::ce_online_block(logits.data_ptr(), out_type_of(logits.scalar_type()), rows,
                                            logits.size(1), a, at::cuda::getCurrentCUDAStream()),
               "ce_online_block");
}

at::Tensor ce_online_finish_cuda(const at::Tensor& state, const at::Tensor& acc, const at::Tensor& weight,
                                 const at::Tensor& labels, const std::optional<at::Tensor>& row_scale_,
                                 int64_t ignore_index, at::Tensor& dh) {
  c10::cuda::CUDAGuard guard(acc.device());
  const at::Tensor row_scale = check_ce_online_finish_args(state, acc, weight, labels, row_scale_, dh);
  const int64_t rows = acc.size(0), H = acc.size(1);
  at::Tensor loss = at::empty({rows}, acc.options());
  CeOnlineFinishArgs a;
  a.row_scale = row_scale.defined() ? row_scale.data_ptr<float>() : nullptr;
  a.state = state.data_ptr<float>();
  a.acc = acc.data_ptr<float>();
  a.labels = labels.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.V = weight.size(0);
  a.H = H;
  a.loss = loss.data_ptr<float>();
  check_launch(sloth::cuda::ce_online_finish(weight.data_ptr(), dh.data_ptr(), out_type_of(weight.scalar_type()), rows,
                                             a, at::cuda::getCurrentCUDAStream()),
               "ce_online_finish");
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CUDA, m) {
  m.impl("ce_online_block", &ce_online_block_cuda);
  m.impl("ce_online_finish", &ce_online_finish_cuda);
}

}  // namespace sloth::cuda
