// Host launchers of the MoE kernels (csrc/cuda/moe.cu): raw pointers and a stream, no torch types.
// csrc/cuda/moe_bindings.cpp validates arguments (csrc/cpu/moe_checks.h) and calls these.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "sloth/moe.h"
#include "sloth/numeric.h"

namespace sloth::cuda {

// logits [T, E] fp32 -> weights [T, k] fp32, ids [T, k] int64 (one warp per token; E <= 1024).
cudaError_t launch_moe_route(const float* logits, int64_t T, int E, int k, int kind, bool renormalize, float* weights,
                             int64_t* ids, cudaStream_t stream);

// Stable counting sort of R = T * k slots by expert (ids int64 or int32): sorted_slots [R], slot_pos [R],
// offsets [E + 1]. workspace: moe_permute_workspace(R, E) int32 entries. Ids outside [0, E) go to a tail
// past offsets[E] (they belong to no expert) and get slot_pos -1 (the combine skips them). Needs E <= 1024.
int64_t moe_permute_workspace(int64_t R, int E);
cudaError_t launch_moe_permute(const void* ids, bool ids_int64, int64_t R, int E, int32_t* sorted_slots,
                               int32_t* slot_pos, int32_t* offsets, int32_t* workspace, cudaStream_t stream);

struct MoeGemmArgs {
  const void* x = nullptr;          // [*, K] contiguous, of `type`
  const int32_t* rows = nullptr;    // [R] gather indices or null (an index outside [0, x_rows) reads zeros)
  int64_t x_rows = 0;               // rows of x
  const int32_t* offsets = nullptr; // [E + 1]
  int32_t* tile_start = nullptr;    // workspace [E + 1] (tensor-core path)
  MoeWeight w;
  bool trans = false;
  const float* bias = nullptr;      // [E, N] fp32 or null
  const void* lora_t = nullptr;     // [R, rank] of `type` or null
  const void* lora_B = nullptr;     // [E, N, rank] of `type`
  int rank = 0;
  float scaling = 1.0f;
  int glu = 0;
  float alpha = 1.702f, limit = 7.0f;
  void* out = nullptr;              // [R, Nout]
  void* pre = nullptr;              // [R, N] or null
  int64_t R = 0, K = 0, N = 0;
  OutType type = OutType::kBF16;
};
cudaError_t launch_moe_grouped_gemm(const MoeGemmArgs& args, cudaStream_t stream);
// Which kernel launch_moe_grouped_gemm picks: 1 tensor cores, 0 the SIMT kernel (small batches, odd shapes).
int moe_grouped_gemm_path(const MoeGemmArgs& args);

// dpre [R, 2I] of h = glu(pre) given dh [R, I]; all of `type`.
cudaError_t launch_moe_glu_backward(const void* dh, const void* pre, void* dpre, int64_t R, int64_t I, int glu,
                                    float alpha, float limit, OutType type, cudaStream_t stream);

// out [T, H] = sum_j w[t, j] y[slot_pos[t * k + j]] (w null: 1); y [R, H] / out of `type`, w fp32. A position
// outside [0, R) contributes nothing (the CPU kernel raises; checking here would need a host synchronization).
cudaError_t launch_moe_combine(const void* y, const int32_t* slot_pos, const float* w, void* out, int64_t T, int k,
                               int64_t H, int64_t R, OutType type, cudaStream_t stream);
// dy[slot_pos[s]] = w[s] dout[s / k], dweights[s] = <dout[s / k], y[slot_pos[s]]> (fp32).
cudaError_t launch_moe_combine_backward(const void* dout, const void* y, const int32_t* slot_pos, const float* w,
                                        void* dy, float* dweights, int64_t T, int k, int64_t H, OutType type,
                                        cudaStream_t stream);

}  // namespace sloth::cuda
