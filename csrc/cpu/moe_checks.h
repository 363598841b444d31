// Argument checks of the MoE ops shared by the CPU and CUDA registrations, and the MoeWeight view of a
// dense / NF4 / MXFP4 expert stack (csrc/include/sloth/moe.h).
#pragma once
#include <ATen/ATen.h>

#include "dtype_dispatch.h"
#include "sloth/moe.h"

namespace sloth {

// moe_route: logits [T, E], 1 <= top_k <= E, kind 0 (softmax then top-k) or 1 (top-k then softmax).
inline void moe_check_route(const at::Tensor& logits, int64_t top_k, int64_t kind) {
  TORCH_CHECK(logits.dim() == 2, "sloth.moe_route: logits must be [tokens, experts], got ", logits.sizes());
  const int64_t E = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "sloth.moe_route: top_k must be in [1, num_experts = ", E, "], got ", top_k);
  TORCH_CHECK(kind == 0 || kind == 1, "sloth.moe_route: kind must be 0 (softmax then top-k, Qwen3-MoE) or 1 ",
              "(top-k then softmax, gpt-oss), got ", kind);
}

// moe_permute: int64 / int32 ids, at least one expert, fewer than 2^31 (token, expert) slots.
inline void moe_check_permute(const at::Tensor& ids, int64_t num_experts) {
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "sloth.moe_permute: expert ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "sloth.moe_permute: num_experts must be >= 1");
  TORCH_CHECK(ids.numel() < (int64_t{1} << 31), "sloth.moe_permute: too many (token, expert) pairs: ", ids.numel());
}

// moe_glu_backward: glu 1-4, pre [R, 2I], dh [R, I].
inline void moe_check_glu_backward(const at::Tensor& dh, const at::Tensor& pre, int64_t glu) {
  TORCH_CHECK(glu >= 1 && glu <= 4, "sloth.moe_glu_backward: glu must be 1-4, got ", glu);
  TORCH_CHECK(pre.dim() == 2 && pre.size(1) % 2 == 0 && dh.dim() == 2 && dh.size(0) == pre.size(0) &&
                  dh.size(1) * 2 == pre.size(1),
              "sloth.moe_glu_backward: pre must be [R, 2I] and dh [R, I], got ", pre.sizes(), " and ", dh.sizes());
}

// moe_combine: y [R, H], slot_pos int32 [T * top_k], weights (when given) [T, top_k].
inline void moe_check_combine(const at::Tensor& y, const at::Tensor& slot_pos, const std::optional<at::Tensor>& weights,
                              int64_t top_k) {
  TORCH_CHECK(y.dim() == 2, "sloth.moe_combine: y must be [R, H], got ", y.sizes());
  TORCH_CHECK(slot_pos.scalar_type() == at::kInt && slot_pos.dim() == 1 && top_k >= 1 &&
                  slot_pos.numel() % top_k == 0,
              "sloth.moe_combine: slot_pos must be int32 [tokens * top_k]");
  if (weights) {
    TORCH_CHECK(weights->numel() == slot_pos.numel(), "sloth.moe_combine: weights must be [tokens, top_k] = [",
                slot_pos.numel() / top_k, ", ", top_k, "], got ", weights->sizes());
  }
}

// moe_combine_backward: dout [T, H], y [R, H], sorted_slots / slot_pos [R], weights [T, top_k] with R = T * top_k.
inline void moe_check_combine_backward(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& sorted_slots,
                                       const at::Tensor& slot_pos, const at::Tensor& weights) {
  const int64_t R = y.size(0), H = y.size(1), top_k = weights.size(-1);
  TORCH_CHECK(dout.dim() == 2 && dout.size(1) == H && dout.size(0) * top_k == R && slot_pos.numel() == R &&
                  sorted_slots.numel() == R && weights.numel() == R,
              "sloth.moe_combine_backward: shapes do not match: dout ", dout.sizes(), ", y ", y.sizes(),
              ", weights ", weights.sizes());
}

inline void moe_check_offsets_shape(const at::Tensor& offsets, int64_t E, const char* op) {
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.numel() == E + 1, "sloth.", op,
              ": offsets must be int32 [num_experts + 1] = [", E + 1, "] (from sloth.ops.moe_permute), got ",
              offsets.scalar_type(), " ", offsets.sizes());
}

// The MoeWeight of `w` (dense [E, A, B] with one unit stride among its last two dims; NF4 packed uint8 with
// `scale` = absmax; MXFP4 blocks [E, A, B / 32, 16] with `scale` = scales [E, A, B / 32]). Tensors must stay
// alive (the caller keeps contiguous copies) while the view is used.
inline MoeWeight moe_weight_view(int64_t fmt, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                                 const std::optional<at::Tensor>& dq_offset, at::IntArrayRef wshape,
                                 int64_t blocksize, int64_t blocksize2, const char* op) {
  TORCH_CHECK(wshape.size() == 3, "sloth.", op, ": wshape must be [E, A, B], got ", wshape);
  MoeWeight v;
  v.fmt = (int)fmt;
  v.E = wshape[0];
  v.A = wshape[1];
  v.B = wshape[2];
  TORCH_CHECK(v.E > 0 && v.A > 0 && v.B > 0, "sloth.", op, ": empty expert weight ", wshape);
  v.data = w.data_ptr();
  if (fmt == kMoeDense) {
    TORCH_CHECK(w.dim() == 3 && w.sizes() == wshape, "sloth.", op, ": dense weight must be [E, A, B] = ", wshape,
                ", got ", w.sizes());
    TORCH_CHECK(w.stride(2) == 1 || w.stride(1) == 1, "sloth.", op,
                ": dense weight needs one of its last two dims contiguous; call .contiguous() on it");
    v.dense_type = out_type_of(w.scalar_type());
    v.s_e = w.stride(0);
    v.s_a = w.stride(1);
    v.s_b = w.stride(2);
    return v;
  }
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "sloth.", op,
              ": 4-bit weight data must be contiguous uint8");
  TORCH_CHECK(scale.has_value() && scale->is_contiguous(), "sloth.", op,
              ": 4-bit weights need their scales (NF4 absmax / MXFP4 scales), contiguous");
  const int64_t n = v.E * v.A * v.B;
  if (fmt == kMoeNf4) {
    TORCH_CHECK(n % 2 == 0 && w.numel() == n / 2, "sloth.", op, ": NF4 packed holds ", w.numel(),
                " bytes, expected E * A * B / 2 = ", n / 2);
    TORCH_CHECK(blocksize >= 8 && (blocksize & (blocksize - 1)) == 0 && (v.A * v.B) % blocksize == 0, "sloth.", op,
                ": NF4 blocksize must be a power of two >= 8 dividing A * B, got ", blocksize);
    TORCH_CHECK(scale->numel() == n / blocksize, "sloth.", op, ": NF4 absmax has ", scale->numel(),
                " entries, expected E * A * B / blocksize = ", n / blocksize);
    v.blocksize = (int)blocksize;
    if (scale->scalar_type() == at::kFloat) {
      v.absmax = scale->data_ptr<float>();
    } else {
      TORCH_CHECK(scale->scalar_type() == at::kByte && code2 && absmax2 && dq_offset, "sloth.", op,
                  ": NF4 absmax must be fp32, or uint8 with code2, absmax2 and offset (double quantization)");
      TORCH_CHECK(code2->scalar_type() == at::kFloat && code2->numel() == 256 && absmax2->scalar_type() == at::kFloat &&
                      dq_offset->scalar_type() == at::kFloat,
                  "sloth.", op, ": code2 must be fp32 [256], absmax2 and offset fp32");
      TORCH_CHECK(blocksize2 > 0 && (blocksize2 & (blocksize2 - 1)) == 0, "sloth.", op,
                  ": blocksize2 must be a power of two, got ", blocksize2);
      TORCH_CHECK(dq_offset->numel() == 1 || dq_offset->numel() == v.E, "sloth.", op,
                  ": offset must have 1 entry or one per expert, got ", dq_offset->numel());
      v.offset_per_expert = dq_offset->numel() == v.E && v.E > 1;
      v.nb_e = v.A * v.B / blocksize;
      v.nb2_e = (v.nb_e + blocksize2 - 1) / blocksize2;
      const int64_t want = v.offset_per_expert ? v.E * v.nb2_e : (scale->numel() + blocksize2 - 1) / blocksize2;
      TORCH_CHECK(absmax2->numel() == want, "sloth.", op, ": absmax2 has ", absmax2->numel(), " entries, expected ",
                  want, v.offset_per_expert ? " (E * ceil(blocks per expert / blocksize2): one double quantization "
                                              "per expert)" : " (ceil(blocks / blocksize2))");
      v.absmax_q = scale->data_ptr<uint8_t>();
      v.code2 = code2->data_ptr<float>();
      v.absmax2 = absmax2->data_ptr<float>();
      v.offset = dq_offset->data_ptr<float>();
      int l = 0;
      while ((int64_t{1} << l) < blocksize2) ++l;
      v.log2_blocksize2 = l;
    }
    return v;
  }
  TORCH_CHECK(fmt == kMoeMxfp4, "sloth.", op, ": weight format must be 0 (dense), 1 (NF4) or 2 (MXFP4), got ", fmt);
  TORCH_CHECK(v.B % 32 == 0 && w.dim() == 4 && w.size(0) == v.E && w.size(1) == v.A && w.size(2) == v.B / 32 &&
                  w.size(3) == 16,
              "sloth.", op, ": MXFP4 blocks must be [E, A, B / 32, 16] = [", v.E, ", ", v.A, ", ", v.B / 32,
              ", 16], got ", w.sizes());
  TORCH_CHECK(scale->scalar_type() == at::kByte && scale->dim() == 3 && scale->size(0) == v.E &&
                  scale->size(1) == v.A && scale->size(2) == v.B / 32,
              "sloth.", op, ": MXFP4 scales must be uint8 [E, A, B / 32], got ", scale->scalar_type(), " ",
              scale->sizes());
  v.scales = scale->data_ptr<uint8_t>();
  return v;
}

// Shapes of a grouped GEMM call: R rows (of x, or of rows), K = in, N = out, Nout = out after the GLU.
struct MoeGemmShape {
  int64_t R, K, N, Nout;
};

inline MoeGemmShape moe_check_gemm(const at::Tensor& x, const std::optional<at::Tensor>& rows,
                                   const at::Tensor& offsets, const MoeWeight& w, bool trans,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_t,
                                   const std::optional<at::Tensor>& lora_B, int64_t glu, const char* op) {
  MoeGemmShape s;
  TORCH_CHECK(x.dim() == 2, "sloth.", op, ": x must be [rows, in], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sloth.", op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  s.K = trans ? w.A : w.B;
  s.N = trans ? w.B : w.A;
  TORCH_CHECK(x.size(1) == s.K, "sloth.", op, ": x has ", x.size(1), " features but the expert weight takes ", s.K,
              trans ? " (trans: dim 1 of [E, A, B])" : " (dim 2 of [E, A, B])");
  if (rows) {
    TORCH_CHECK(rows->scalar_type() == at::kInt && rows->dim() == 1, "sloth.", op, ": rows must be int32 [R], got ",
                rows->scalar_type(), " ", rows->sizes());
    s.R = rows->numel();
  } else {
    s.R = x.size(0);
  }
  moe_check_offsets_shape(offsets, w.E, op);
  TORCH_CHECK(glu >= 0 && glu <= 4, "sloth.", op, ": glu must be 0 (none), 1 (SwiGLU), 2 (SwiGLU interleaved), ",
              "3 (gpt-oss clamped, interleaved) or 4 (clamped, concatenated), got ", glu);
  if (glu) TORCH_CHECK(s.N % 2 == 0, "sloth.", op, ": a GLU needs an even output width, got ", s.N);
  s.Nout = glu ? s.N / 2 : s.N;
  if (bias) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == w.E && bias->size(1) == s.N, "sloth.", op, ": bias must be [E, ",
                "out] = [", w.E, ", ", s.N, "], got ", bias->sizes());
  }
  TORCH_CHECK(lora_t.has_value() == lora_B.has_value(), "sloth.", op, ": pass lora_t and lora_B together");
  if (lora_t) {
    TORCH_CHECK(lora_t->dim() == 2 && lora_t->size(0) == s.R, "sloth.", op, ": lora_t must be [R, r] with R = ", s.R,
                ", got ", lora_t->sizes());
    TORCH_CHECK(lora_B->dim() == 3 && lora_B->size(0) == w.E && lora_B->size(1) == s.N &&
                    lora_B->size(2) == lora_t->size(1),
                "sloth.", op, ": lora_B must be [E, out, r] = [", w.E, ", ", s.N, ", ", lora_t->size(1), "], got ",
                lora_B->sizes());
    TORCH_CHECK(lora_t->scalar_type() == x.scalar_type() && lora_B->scalar_type() == x.scalar_type(), "sloth.", op,
                ": lora_t and lora_B must have x's dtype ", x.scalar_type());
  }
  return s;
}

}  // namespace sloth
