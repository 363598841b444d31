// Host-side launchers of the CUDA kernels (launch_*): raw pointers and a stream, no torch types. The torch
// bindings (bindings.cpp) validate arguments (csrc/include/sloth/op_checks.h) and call these.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "sloth/numeric.h"

namespace sloth::cuda {

// NF4 absmax: fp32 `absmax`, or (double quantization) uint8 `absmax_q` with fp32 `code2[256]`,
// `absmax2[ceil(blocks / blocksize2)]` and `offset[1]`.
struct Nf4Absmax {
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* code2 = nullptr;
  const float* absmax2 = nullptr;
  const float* offset = nullptr;
  int log2_blocksize2 = 8;  // absmax2 covers 2^log2_blocksize2 blocks (bitsandbytes: 256)
};

cudaError_t launch_nf4_dequantize(const uint8_t* packed, Nf4Absmax absmax, int64_t n, int blocksize, void* out,
                           OutType out_type, cudaStream_t stream);
cudaError_t launch_nf4_quantize(const void* x, OutType in_type, int64_t n, int blocksize, uint8_t* packed,
                         float* absmax, cudaStream_t stream);
cudaError_t launch_blockwise8_quantize(const void* x, OutType in_type, int64_t n, const float* code, int blocksize,
                                uint8_t* q, float* absmax, cudaStream_t stream);
cudaError_t launch_mxfp4_dequantize(const uint8_t* blocks, const uint8_t* scales, int64_t rows, void* out,
                             OutType out_type, cudaStream_t stream);
cudaError_t launch_mxfp4_quantize(const void* x, OutType in_type, int64_t rows, uint8_t* blocks, uint8_t* scales,
                           cudaStream_t stream);

// ---- chunked linear cross-entropy: cross_entropy.cu ----

// Per-row arguments of one chunk of logits.
struct CeChunkArgs {
  const int64_t* labels = nullptr;        // [rows]
  const float* grad_nll = nullptr;        // [rows] or null (= 1)
  const float* grad_entropy = nullptr;    // [rows] or null (= 0)
  float grad_scale = 1.0f, softcap = 0.0f, logit_scale = 1.0f;
  int64_t ignore_index = -100;
  bool compute_grad = false;
  float* loss = nullptr;                  // [rows] out
  float* lse = nullptr;                   // [rows] out
  float* entropy = nullptr;               // [rows] out
};

// logits: [rows, V] contiguous of `type`, overwritten in place by the gradient when args.compute_grad.
cudaError_t launch_cross_entropy_chunk(void* logits, OutType type, int64_t rows, int64_t V, CeChunkArgs args,
                                cudaStream_t stream);

// ---- QLoRA GEMV and fused GLU: nf4_gemv.cu, glu.cu ----

// y [m, n] = x [m, k] W^T + scaling * lora_t [m, r] lora_B^T [r, n] + bias [n], W NF4-packed [n, k]
// (row-major, bitsandbytes layout). x, lora_t, lora_B, bias, y have type `type` (bf16 or fp16);
// lora_t / lora_B / bias may be null. Needs m <= 16, k % 32 == 0, 16-byte aligned packed and x.
// Returns cudaErrorNotSupported where the GEMV cannot run (the caller then dequantizes + GEMMs).
struct Nf4GemvArgs {
  const void* x = nullptr;
  const uint8_t* packed = nullptr;
  Nf4Absmax absmax;
  int blocksize = 64;
  const void* lora_t = nullptr;
  const void* lora_B = nullptr;
  int rank = 0;
  float scaling = 0.0f;
  const void* bias = nullptr;
  void* y = nullptr;
  int m = 0;
  int64_t n = 0;
  int64_t k = 0;
};
bool nf4_gemv_supported(int m, int64_t k, OutType type);
cudaError_t launch_nf4_gemv_lora(const Nf4GemvArgs& args, OutType type, cudaStream_t stream);

cudaError_t launch_glu_forward(const void* gate, const void* up, void* out, int64_t n, OutType type, int kind,
                        cudaStream_t stream);
cudaError_t launch_glu_backward(const void* grad, void* gate, void* up, int64_t n, OutType type, int kind,
                         cudaStream_t stream);


// ---- RMSNorm and RoPE: norm_rope.cu ----

// x, w, y: [rows, H] / [H] / [rows, H] contiguous of `type`; rstd [rows] fp32 out.
// cudaErrorNotSupported when H is too large for one CTA per row (H > 16384 unaligned, > 65536 aligned).
cudaError_t launch_rms_norm_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t H,
                             OutType type, float eps, float offset, bool cast_before_weight, cudaStream_t stream);
// Number of CTAs (= fp32 partial rows of dw, [nparts, H] workspace) that rms_norm_backward uses for `rows`.
int rms_norm_backward_parts(int64_t rows);
// dx [rows, H] out; dw [H] fp32 out (null: not computed), partial [nparts, H] fp32 workspace.
cudaError_t launch_rms_norm_backward(const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                              float* dw, float* partial, int nparts, int64_t rows, int64_t H, OutType type,
                              float offset, bool cast_before_weight, cudaStream_t stream);
// RoPE of src [tokens, heads, D] (strides (src_t, src_h, 1)) into dst (strides (dst_t, dst_h, 1); dst == src
// with equal strides rotates in place): the first rot_dim dims, cos / sin [tokens, rot_dim] fp32 contiguous.
// Dims past rot_dim are not touched (the caller copies them for an out-of-place rotation).
struct RopeLayout {
  const void* src = nullptr;
  int64_t src_t = 0, src_h = 0;
  void* dst = nullptr;
  int64_t dst_t = 0, dst_h = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t tokens = 0, heads = 0, rot_dim = 0;
};
cudaError_t launch_rope(const RopeLayout& layout, OutType type, bool inverse, cudaStream_t stream);


// ---- online linear cross-entropy for a frozen head: linear_ce_online.cu ----

// One vocabulary block [rows, vb] of raw logits starting at column vocab_start (0: the row's first block,
// whose state is then initialized rather than read). state [rows, 4] fp32 (m, s, z_label, dz/dx_label),
// acc [rows, H] fp32 (rescaled in place where m moves; not read on the first block).
struct CeOnlineBlockArgs {
  const int64_t* labels = nullptr;  // [rows]
  int64_t vocab_start = 0;
  float* state = nullptr;
  float* acc = nullptr;
  int64_t H = 0;
  float softcap = 0.0f, logit_scale = 1.0f, margin = 0.0f;
};
cudaError_t launch_ce_online_block(void* logits, OutType type, int64_t rows, int64_t vb, CeOnlineBlockArgs args,
                            cudaStream_t stream);

struct CeOnlineFinishArgs {
  const float* state = nullptr;  // [rows, 4]
  const float* acc = nullptr;    // [rows, H]
  const int64_t* labels = nullptr;
  const float* row_scale = nullptr;  // [rows] or null (= 1)
  int64_t ignore_index = -100, V = 0, H = 0;
  float* loss = nullptr;  // [rows] out
};
// dh [rows, H] of `type` out, from weight [V, H] of `type`.
cudaError_t launch_ce_online_finish(const void* weight, void* dh, OutType type, int64_t rows, CeOnlineFinishArgs args,
                             cudaStream_t stream);

}  // namespace sloth::cuda
