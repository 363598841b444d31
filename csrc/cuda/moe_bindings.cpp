// CUDA registrations of the MoE ops: argument checks (csrc/cpu/moe_checks.h), outputs, workspaces, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/dtype_dispatch.h"
#include "../cpu/moe_checks.h"
#include "moe.h"
#include "check_launch.h"

namespace sloth::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits_, int64_t top_k, int64_t kind,
                                                  bool renormalize) {
  moe_check_route(logits_, top_k, kind);
  const int64_t T = logits_.size(0), E = logits_.size(1);
  TORCH_CHECK(E <= 1024, "sloth.moe_route: at most 1024 experts on CUDA, got ", E);
  c10::cuda::CUDAGuard guard(logits_.device());
  at::Tensor logits = logits_.to(at::kFloat).contiguous();
  at::Tensor w = at::empty({T, top_k}, logits.options());
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  check_launch(launch_moe_route(logits.data_ptr<float>(), T, (int)E, (int)top_k, (int)kind, renormalize,
                                w.data_ptr<float>(), ids.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
               "moe_route");
  return {w, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& ids_, int64_t num_experts) {
  moe_check_permute(ids_, num_experts);
  TORCH_CHECK(num_experts <= 1024, "sloth.moe_permute: num_experts must be in [1, 1024] on CUDA, got ", num_experts);
  c10::cuda::CUDAGuard guard(ids_.device());
  at::Tensor ids = ids_.contiguous();
  const int64_t R = ids.numel();
  auto opts = ids.options().dtype(at::kInt);
  at::Tensor sorted = at::empty({R}, opts), pos = at::empty({R}, opts), offsets = at::empty({num_experts + 1}, opts);
  at::Tensor ws = at::empty({moe_permute_workspace(R, (int)num_experts)}, opts);
  check_launch(launch_moe_permute(ids.data_ptr(), ids.scalar_type() == at::kLong, R, (int)num_experts,
                                  sorted.data_ptr<int32_t>(), pos.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                  ws.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()),
               "moe_permute");
  return {sorted, pos, offsets};
}

std::tuple<at::Tensor, at::Tensor> moe_grouped_gemm_cuda(
    const at::Tensor& x_, const std::optional<at::Tensor>& rows_, const at::Tensor& offsets_, int64_t fmt,
    const at::Tensor& w_, const std::optional<at::Tensor>& scale_, const std::optional<at::Tensor>& code2_,
    const std::optional<at::Tensor>& absmax2_, const std::optional<at::Tensor>& dq_offset_, at::IntArrayRef wshape,
    int64_t blocksize, int64_t blocksize2, bool trans, const std::optional<at::Tensor>& bias_,
    const std::optional<at::Tensor>& lora_t_, const std::optional<at::Tensor>& lora_B_, double scaling, int64_t glu,
    double alpha, double limit, bool return_pre) {
  const char* op = "moe_grouped_gemm";
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous(), offsets = offsets_.contiguous();
  at::Tensor w = fmt == kMoeDense ? w_ : w_.contiguous();
  auto rows = contiguous(rows_), scale = contiguous(scale_), code2 = contiguous(code2_);
  auto absmax2 = contiguous(absmax2_), dq_offset = contiguous(dq_offset_), lora_t = contiguous(lora_t_),
       lora_B = contiguous(lora_B_);
  std::optional<at::Tensor> bias;
  if (bias_) bias = bias_->to(at::kFloat).contiguous();
  MoeWeight wv = moe_weight_view(fmt, w, scale, code2, absmax2, dq_offset, wshape, blocksize, blocksize2, op);
  MoeGemmShape s = moe_check_gemm(x, rows, offsets, wv, trans, bias, lora_t, lora_B, glu, op);
  if (fmt != kMoeDense) TORCH_CHECK(wv.B % 8 == 0, "sloth.", op, ": 4-bit expert weights need B % 8 == 0, got ", wv.B);
  at::Tensor out = at::empty({s.R, s.Nout}, x.options());
  at::Tensor pre = at::empty({(glu && return_pre) ? s.R : 0, s.N}, x.options());
  at::Tensor tile_start = at::empty({wv.E + 1}, offsets.options());
  MoeGemmArgs a;
  a.x = x.data_ptr();
  a.rows = rows ? rows->data_ptr<int32_t>() : nullptr;
  a.x_rows = x.size(0);
  a.offsets = offsets.data_ptr<int32_t>();
  a.tile_start = tile_start.data_ptr<int32_t>();
  a.w = wv;
  a.trans = trans;
  a.bias = bias ? bias->data_ptr<float>() : nullptr;
  a.lora_t = lora_t ? lora_t->data_ptr() : nullptr;
  a.lora_B = lora_B ? lora_B->data_ptr() : nullptr;
  a.rank = lora_t ? (int)lora_t->size(1) : 0;
  a.scaling = (float)scaling;
  a.glu = (int)glu;
  a.alpha = (float)alpha;
  a.limit = (float)limit;
  a.out = out.data_ptr();
  a.pre = (glu && return_pre) ? pre.data_ptr() : nullptr;
  a.R = s.R;
  a.K = s.K;
  a.N = s.N;
  a.type = out_type_of(x.scalar_type());
  check_launch(launch_moe_grouped_gemm(a, c10::cuda::getCurrentCUDAStream()), op);
  return {out, pre};
}

at::Tensor moe_glu_backward_cuda(const at::Tensor& dh_, const at::Tensor& pre_, int64_t glu, double alpha,
                                 double limit) {
  moe_check_glu_backward(dh_, pre_, glu);
  c10::cuda::CUDAGuard guard(pre_.device());
  at::Tensor pre = pre_.contiguous(), dh = dh_.to(pre_.scalar_type()).contiguous();
  at::Tensor dpre = at::empty_like(pre);
  check_launch(launch_moe_glu_backward(dh.data_ptr(), pre.data_ptr(), dpre.data_ptr(), pre.size(0), dh.size(1),
                                       (int)glu, (float)alpha, (float)limit, out_type_of(pre.scalar_type()),
                                       c10::cuda::getCurrentCUDAStream()),
               "moe_glu_backward");
  return dpre;
}

at::Tensor moe_combine_cuda(const at::Tensor& y_, const at::Tensor& slot_pos_, const std::optional<at::Tensor>& w_,
                            int64_t top_k) {
  moe_check_combine(y_, slot_pos_, w_, top_k);
  c10::cuda::CUDAGuard guard(y_.device());
  at::Tensor y = y_.contiguous(), sp = slot_pos_.contiguous();
  const int64_t T = sp.numel() / top_k, H = y.size(1);
  std::optional<at::Tensor> w;
  if (w_) w = w_->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T, H}, y.options());
  check_launch(launch_moe_combine(y.data_ptr(), sp.data_ptr<int32_t>(), w ? w->data_ptr<float>() : nullptr,
                                  out.data_ptr(), T, (int)top_k, H, y.size(0), out_type_of(y.scalar_type()),
                                  c10::cuda::getCurrentCUDAStream()),
               "moe_combine");
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward_cuda(const at::Tensor& dout_, const at::Tensor& y_,
                                                             const at::Tensor& sorted_slots, const at::Tensor& slot_pos_,
                                                             const at::Tensor& w_) {
  moe_check_combine_backward(dout_, y_, sorted_slots, slot_pos_, w_);
  const int64_t H = y_.size(1), top_k = w_.size(-1);
  c10::cuda::CUDAGuard guard(y_.device());
  at::Tensor y = y_.contiguous(), dout = dout_.to(y_.scalar_type()).contiguous(), sp = slot_pos_.contiguous(),
             w = w_.to(at::kFloat).contiguous();
  at::Tensor dy = at::empty_like(y), dw = at::empty(w_.sizes(), w.options());
  check_launch(launch_moe_combine_backward(dout.data_ptr(), y.data_ptr(), sp.data_ptr<int32_t>(), w.data_ptr<float>(),
                                           dy.data_ptr(), dw.data_ptr<float>(), dout.size(0), (int)top_k, H,
                                           out_type_of(y.scalar_type()), c10::cuda::getCurrentCUDAStream()),
               "moe_combine_backward");
  return {dy, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_grouped_gemm", &moe_grouped_gemm_cuda);
  m.impl("moe_glu_backward", &moe_glu_backward_cuda);
  m.impl("moe_combine", &moe_combine_cuda);
  m.impl("moe_combine_backward", &moe_combine_backward_cuda);
}

}  // namespace sloth::cuda
