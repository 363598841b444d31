// Host-side launchers of the attention kernels (attention.cu): raw pointers, strides and a stream, no torch types.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace sloth::cuda {

// Row (token i of document b, head h) of a [.., tokens, heads, D] tensor with a contiguous last dim lives at
//   base + b * sb + (start_b + i) * st + h * sh,
// start_b = cu_seqlens[b] when packed (sb = 0), 0 when dense. lse / delta: index b * lse_sb + h * lse_sh + start_b + i.
struct AttnStrides {
  int64_t sb = 0, st = 0, sh = 0;
};

struct AttnFwdArgs {
  const void* q = nullptr;  // bf16 / fp16
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  AttnStrides q_s, k_s, v_s, o_s;
  int64_t lse_sb = 0, lse_sh = 0;
  const int* cu_q = nullptr;  // [B + 1] or null (dense)
  const int* cu_k = nullptr;
  const float* sinks = nullptr;  // [Hq] or null
  int B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0;  // dense: lengths; packed: max lengths
  float scale = 1.f, softcap = 0.f;
  int window = 0;  // 0: none
  bool causal = true;
  bool bf16 = true;  // else fp16
};

struct AttnBwdArgs : AttnFwdArgs {
  const void* dout = nullptr;  // like out
  AttnStrides do_s;
  float* delta = nullptr;     // rowsum(dout * out), laid out as lse
  float* dq_accum = nullptr;  // fp32 [tokens, Hq, D] contiguous, zeroed (token = start_b + i, dense: b * Sq + i)
  void* dk = nullptr;         // like k, written whole
  void* dv = nullptr;
  AttnStrides dk_s, dv_s;
  float* dsinks = nullptr;  // [Hq] fp32, zeroed; null without sinks
  int64_t Tq = 0;           // query tokens (dense: B * Sq)
};

// out and lse (fp32, sink included; -inf for a row that sees nothing). D in {64, 128, 256}.
cudaError_t attention_forward(const AttnFwdArgs& a, cudaStream_t stream);
// delta, dsinks, then dq_accum (fp32 atomics), dk, dv.
cudaError_t attention_backward(const AttnBwdArgs& a, cudaStream_t stream);

}  // namespace sloth::cuda
