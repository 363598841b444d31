// Argument checks of the torch.ops.sloth ops, shared by the CPU kernels (csrc/cpu) and the CUDA / HIP bindings:
// every op validates here, in C++, whatever calls it (python/sloth/ops checks first with friendlier errors; these
// guard direct torch.ops.sloth calls, which are public API: a bad argument is an exception, never a crash).
// Host-only (ATen); the .cu kernels never include it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>

#include "sloth/numeric.h"

namespace sloth {

// ---- dtypes and devices ----

inline OutType out_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return OutType::kF32;
    case at::kHalf: return OutType::kF16;
    case at::kBFloat16: return OutType::kBF16;
    default: TORCH_CHECK(false, "sloth: expected float32, float16 or bfloat16, got ", t);
  }
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "sloth.", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", s);
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "sloth.", op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "sloth.", op, ": ", name, " is on ", t.device(), " but the inputs are on ",
              ref.device());
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t) return std::nullopt;
  return t->contiguous();
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// ---- NF4 / blockwise 8-bit (bitsandbytes layout) ----

// The NF4 blocksizes bitsandbytes accepts (and the GPU kernels assume: a power of two, >= 8 elements per block).
inline void check_nf4_blocksize(int64_t blocksize, const char* op) {
  TORCH_CHECK(is_pow2(blocksize) && blocksize >= 32 && blocksize <= 4096, "sloth.", op,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The absmax of n elements quantized in blocks of `blocksize`: fp32 [blocks], or uint8 [blocks] with code2 [256],
// absmax2 [ceil(blocks / blocksize2)] and offset [1] (fp32), all on `device`.
inline void check_nf4_absmax(const at::Tensor& absmax, int64_t n, int64_t blocksize,
                             const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                             const std::optional<at::Tensor>& offset, int64_t blocksize2, const at::Tensor& ref,
                             const char* op) {
  check_nf4_blocksize(blocksize, op);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat || absmax.scalar_type() == at::kByte, "sloth.", op,
              ": absmax must be float32 or uint8 (double-quantized), got ", absmax.scalar_type());
  check_device(absmax, ref, op, "absmax");
  const int64_t blocks = ceil_div(n, blocksize);
  TORCH_CHECK(absmax.numel() == blocks, "sloth.", op, ": absmax has ", absmax.numel(), " entries, expected ceil(",
              n, " / ", blocksize, ") = ", blocks);
  if (absmax.scalar_type() == at::kFloat) return;
  TORCH_CHECK(code2 && absmax2 && offset, "sloth.", op, ": uint8 absmax needs code2, absmax2 and offset");
  TORCH_CHECK(is_pow2(blocksize2), "sloth.", op, ": blocksize2 (absmax blocks per absmax2 entry) must be a power of "
              "two, got ", blocksize2);
  for (auto [t, name] : {std::pair{&*code2, "code2"}, {&*absmax2, "absmax2"}, {&*offset, "offset"}}) {
    check_dtype(*t, at::kFloat, op, name);
    check_device(*t, ref, op, name);
  }
  TORCH_CHECK(code2->numel() == 256, "sloth.", op, ": code2 must have 256 entries, got ", code2->numel());
  TORCH_CHECK(offset->numel() == 1, "sloth.", op, ": offset must have 1 entry, got ", offset->numel());
  TORCH_CHECK(absmax2->numel() == ceil_div(blocks, blocksize2), "sloth.", op, ": absmax2 has ", absmax2->numel(),
              " entries, expected ceil(", blocks, " / ", blocksize2, ") = ", ceil_div(blocks, blocksize2));
}

// packed (uint8) holds n NF4 codes.
inline void check_nf4_packed(const at::Tensor& packed, int64_t n, const char* op) {
  check_dtype(packed, at::kByte, op, "packed");
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "sloth.", op, ": packed holds ", packed.numel(), " bytes but ", n,
              " elements need ", (n + 1) / 2);
}

inline int64_t checked_numel(at::IntArrayRef shape, const char* op) {
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "sloth.", op, ": shape ", shape, " has a negative size");
    TORCH_CHECK(s == 0 || n <= INT64_MAX / s, "sloth.", op, ": shape ", shape, " is too large");
    n *= s;
  }
  return n;
}

inline void check_nf4_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t n, int64_t blocksize,
                                      at::ScalarType dtype, const std::optional<at::Tensor>& code2,
                                      const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                                      int64_t blocksize2, const char* op) {
  check_nf4_packed(packed, n, op);
  check_nf4_absmax(absmax, n, blocksize, code2, absmax2, offset, blocksize2, packed, op);
  (void)out_type_of(dtype);
}

inline void check_blockwise8_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  const char* op = "blockwise8_quantize";
  check_float(x, op, "x");
  check_dtype(code, at::kFloat, op, "code");
  check_device(code, x, op, "code");
  TORCH_CHECK(code.numel() == 256, "sloth.", op, ": code must have 256 entries, got ", code.numel());
  TORCH_CHECK(blocksize > 0 && blocksize <= (int64_t{1} << 30), "sloth.", op, ": blocksize must be positive, got ",
              blocksize);
}

// ---- MXFP4 ----

inline void check_mxfp4_quantize_args(const at::Tensor& x, int64_t block) {
  check_float(x, "mxfp4_quantize", "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % block == 0, "sloth.mxfp4_quantize: the last dimension must be a multiple "
              "of ", block, ", got shape ", x.sizes());
}

inline void check_mxfp4_dequantize_args(const at::Tensor& blocks, const at::Tensor& scales, at::ScalarType dtype,
                                        int64_t block) {
  const char* op = "mxfp4_dequantize";
  check_dtype(blocks, at::kByte, op, "blocks");
  check_dtype(scales, at::kByte, op, "scales");
  check_device(scales, blocks, op, "scales");
  TORCH_CHECK(blocks.dim() >= 2 && blocks.size(-1) == block / 2 && scales.sizes() == blocks.sizes().slice(0, blocks.dim() - 1),
              "sloth.", op, ": blocks must be [..., G, ", block / 2, "] with scales [..., G]; got ", blocks.sizes(), " and ",
              scales.sizes());
  (void)out_type_of(dtype);
}

// ---- GLU ----

inline void check_glu_kind(int64_t kind, const char* op) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "sloth.", op, ": kind must be 0 (SwiGLU), 1 (GeGLU tanh) or 2 (GeGLU erf), got ",
              kind);
}

inline void check_glu_pair(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), "sloth.", op, ": ", an, " ", a.sizes(), " and ", bn, " ", b.sizes(),
              " must have the same shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sloth.", op, ": ", an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  check_device(b, a, op, bn);
}

inline void check_glu_forward_args(const at::Tensor& gate, const at::Tensor& up, int64_t kind) {
  check_float(gate, "glu_forward", "gate");
  check_glu_pair(gate, up, "gate", "up", "glu_forward");
  check_glu_kind(kind, "glu_forward");
}

inline void check_glu_backward_args(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                    int64_t kind) {
  const char* op = "glu_backward";
  check_float(gate, op, "gate");
  check_glu_pair(gate, up, "gate", "up", op);
  check_glu_pair(gate, grad, "gate", "grad", op);
  check_glu_kind(kind, op);
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), "sloth.", op,
              ": gate and up are written in place and must be contiguous");
  const auto overlap = at::get_overlap_status(gate, up);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, "sloth.", op,
              ": gate and up are written in place and must not share memory");
}

// ---- QLoRA GEMV ----

inline void check_nf4_gemv_lora_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& code2,
                                     const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                                     int64_t blocksize2, const std::optional<at::Tensor>& lora_t,
                                     const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& bias) {
  const char* op = "nf4_gemv_lora";
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() == 2, "sloth.", op, ": x must be [M, K], got ", x.sizes());
  TORCH_CHECK(out_features >= 0, "sloth.", op, ": out_features must be >= 0, got ", out_features);
  const int64_t k = x.size(1);
  TORCH_CHECK(k == 0 || out_features <= INT64_MAX / k, "sloth.", op, ": the weight is too large");
  check_device(packed, x, op, "packed");
  check_nf4_packed(packed, out_features * k, op);
  check_nf4_absmax(absmax, out_features * k, blocksize, code2, absmax2, offset, blocksize2, x, op);
  TORCH_CHECK(lora_t.has_value() == lora_B.has_value(), "sloth.", op, ": pass lora_t and lora_B together");
  if (lora_t) {
    check_device(*lora_t, x, op, "lora_t");
    check_device(*lora_B, x, op, "lora_B");
    TORCH_CHECK(lora_t->dim() == 2 && lora_B->dim() == 2 && lora_t->size(0) == x.size(0) &&
                    lora_B->size(0) == out_features && lora_t->size(1) == lora_B->size(1),
                "sloth.", op, ": lora_t must be [M, r] and lora_B [N, r] with M = ", x.size(0), ", N = ", out_features,
                "; got ", lora_t->sizes(), " and ", lora_B->sizes());
  }
  if (bias) {
    check_device(*bias, x, op, "bias");
    TORCH_CHECK(bias->numel() == out_features, "sloth.", op, ": bias must have ", out_features, " entries, got ",
                bias->numel());
  }
}

// ---- cross-entropy ----

inline void check_labels(const at::Tensor& labels, int64_t rows, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), "sloth.", op,
              ": labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(labels.numel() == rows, "sloth.", op, ": labels must have ", rows, " entries, got ", labels.numel());
  check_device(labels, ref, op, "labels");
}

inline void check_cross_entropy_chunk_args(const at::Tensor& logits, const at::Tensor& labels,
                                           const std::optional<at::Tensor>& grad_nll,
                                           const std::optional<at::Tensor>& grad_entropy) {
  const char* op = "cross_entropy_chunk";
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "sloth.", op, ": logits must be a contiguous [rows, V] "
              "tensor (it is updated in place)");
  const int64_t rows = logits.size(0);
  check_labels(labels, rows, logits, op);
  for (auto [t, name] : {std::pair{&grad_nll, "grad_nll"}, {&grad_entropy, "grad_entropy"}}) {
    if (!*t) continue;
    check_device(**t, logits, op, name);
    TORCH_CHECK((*t)->numel() == rows, "sloth.", op, ": ", name, " must have ", rows, " entries, got ", (*t)->numel());
  }
}

inline void check_ce_online_block_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                                       const at::Tensor& acc) {
  const char* op = "ce_online_block";
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "sloth.", op, ": logits must be a contiguous [rows, vb] "
              "tensor (it is updated in place)");
  const int64_t rows = logits.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == rows && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "sloth.", op, ": labels must be contiguous int64 [", rows, "]");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 2 && state.size(0) == rows &&
                  state.size(1) == 4,
              "sloth.", op, ": state must be contiguous fp32 [", rows, ", 4]");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.dim() == 2 && acc.size(0) == rows,
              "sloth.", op, ": acc must be contiguous fp32 [", rows, ", H]");
  for (auto [t, name] : {std::pair{&labels, "labels"}, {&state, "state"}, {&acc, "acc"}}) check_device(*t, logits, op, name);
}

// Checks the arguments; returns row_scale as a contiguous fp32 tensor (undefined when not given).
inline at::Tensor check_ce_online_finish_args(const at::Tensor& state, const at::Tensor& acc, const at::Tensor& weight,
                                              const at::Tensor& labels, const std::optional<at::Tensor>& row_scale,
                                              const at::Tensor& dh) {
  const char* op = "ce_online_finish";
  TORCH_CHECK(acc.dim() == 2, "sloth.", op, ": acc must be [rows, H]");
  const int64_t rows = acc.size(0), H = acc.size(1);
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && state.scalar_type() == at::kFloat &&
                  state.is_contiguous() && state.numel() == 4 * rows,
              "sloth.", op, ": state [rows, 4] and acc [rows, H] must be contiguous fp32");
  check_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H && weight.is_contiguous() && dh.is_contiguous() &&
                  dh.dim() == 2 && dh.size(0) == rows && dh.size(1) == H && dh.scalar_type() == weight.scalar_type(),
              "sloth.", op, ": weight [V, H] and dh [rows, H] must be contiguous and of one dtype");
  TORCH_CHECK(labels.numel() == rows && labels.scalar_type() == at::kLong && labels.is_contiguous(), "sloth.", op,
              ": labels must be contiguous int64 [", rows, "]");
  for (auto [t, name] : {std::pair{&state, "state"}, {&weight, "weight"}, {&labels, "labels"}, {&dh, "dh"}})
    check_device(*t, acc, op, name);
  at::Tensor scale;
  if (row_scale) {
    check_device(*row_scale, acc, op, "row_scale");
    scale = row_scale->to(at::kFloat).contiguous();
  }
  TORCH_CHECK(!scale.defined() || scale.numel() == rows, "sloth.", op, ": row_scale must have ", rows, " entries");
  return scale;
}

// ---- RMSNorm and RoPE ----

inline void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() == 2, "sloth.", op, ": x must be [rows, H], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "sloth.", op, ": weight must be [", x.size(1),
              "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "sloth.", op, ": weight and x must have one dtype, got ",
              weight.scalar_type(), " and ", x.scalar_type());
  check_device(weight, x, op, "weight");
}

inline void check_rms_norm_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& rstd) {
  const char* op = "rms_norm_backward";
  check_norm_args(x, weight, op);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "sloth.", op,
              ": dy must match x in shape and dtype");
  TORCH_CHECK(rstd.numel() == x.size(0) && rstd.scalar_type() == at::kFloat, "sloth.", op,
              ": rstd must be [rows] float32");
  check_device(dy, x, op, "dy");
  check_device(rstd, x, op, "rstd");
}

// rope_ (in_place) rotates q and k where they are; rope writes new tensors and only reads them.
inline void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                            bool in_place) {
  const char* op = in_place ? "rope_" : "rope";
  check_float(q, op, "q");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "sloth.", op, ": q and k must be [tokens, heads, D], got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "sloth.", op, ": q ", q.sizes(), " and k ", k.sizes(),
              " must share tokens and head_dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "sloth.", op, ": q and k must have one dtype");
  check_device(k, q, op, "k");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "sloth.", op, ": the last dim of q and k must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0), "sloth.", op,
              ": cos and sin must be [tokens, rot_dim] with tokens = ", q.size(0), ", got ", cos.sizes(), " and ",
              sin.sizes());
  check_device(cos, q, op, "cos");
  check_device(sin, q, op, "sin");
  TORCH_CHECK(at::isFloatingType(cos.scalar_type()) && at::isFloatingType(sin.scalar_type()), "sloth.", op,
              ": cos and sin must be floating point");
  TORCH_CHECK(cos.size(1) % 2 == 0 && cos.size(1) <= q.size(2), "sloth.", op, ": rot_dim ", cos.size(1),
              " must be even and <= head_dim ", q.size(2));
  if (in_place) {
    const auto overlap = at::get_overlap_status(q, k);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, "sloth.", op,
                ": q and k share memory (they would be rotated twice); pass distinct tensors");
    TORCH_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes && at::has_internal_overlap(k) != at::MemOverlap::Yes,
                "sloth.", op, ": q and k are written in place and must not overlap themselves (e.g. an expand()ed "
                "tensor)");
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
