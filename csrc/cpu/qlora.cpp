// CPU kernels of the QLoRA linear ops: dequantize-into-workspace and the small-M NF4 GEMV + LoRA, with
// the same semantics as the CUDA kernels (fp32 accumulation), built on the CPU nf4_dequantize.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "sloth/op_checks.h"

namespace sloth::cpu {
namespace {

at::Tensor call_nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, at::IntArrayRef shape,
                               int64_t blocksize, at::ScalarType dtype, const std::optional<at::Tensor>& code2,
                               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                               int64_t blocksize2) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sloth::nf4_dequantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t,
                                         at::ScalarType, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         int64_t)>();
  return op.call(packed, absmax, shape, blocksize, dtype, code2, absmax2, offset, blocksize2);
}

void nf4_dequantize_out(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                        const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                        const std::optional<at::Tensor>& offset, int64_t blocksize2, const at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "sloth.nf4_dequantize_out: out must be contiguous");
  check_device(out, packed, "nf4_dequantize_out", "out");
  check_nf4_dequantize_args(packed, absmax, out.numel(), blocksize, out.scalar_type(), code2, absmax2, offset, blocksize2,
                            "nf4_dequantize_out");
  out.copy_(call_nf4_dequantize(packed, absmax, out.sizes(), blocksize, out.scalar_type(), code2, absmax2, offset,
                                blocksize2));
}

at::Tensor nf4_gemv_lora(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& code2,
                         const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                         int64_t blocksize2, const std::optional<at::Tensor>& lora_t,
                         const std::optional<at::Tensor>& lora_B, double scaling, const std::optional<at::Tensor>& bias) {
  check_nf4_gemv_lora_args(x, packed, absmax, out_features, blocksize, code2, absmax2, offset, blocksize2, lora_t, lora_B,
                           bias);
  const int64_t k = x.size(1);
  at::Tensor w = call_nf4_dequantize(packed, absmax, {out_features, k}, blocksize, at::kFloat, code2, absmax2,
                                     offset, blocksize2);                      // [N, K] fp32
  at::Tensor y = at::matmul(x.to(at::kFloat), w.t());                        // [M, N] fp32
  if (lora_t && lora_B) y.addmm_(lora_t->to(at::kFloat), lora_B->to(at::kFloat).t(), 1.0, scaling);
  if (bias) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("nf4_dequantize_out", &nf4_dequantize_out);
  m.impl("nf4_gemv_lora", &nf4_gemv_lora);
}

}  // namespace sloth::cpu
