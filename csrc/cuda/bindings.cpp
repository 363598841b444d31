// CUDA kernel registrations for torch.ops.sloth: argument checks, output allocation, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/dtype_dispatch.h"
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
    a.blocksize2 = (int)blocksize2;
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
