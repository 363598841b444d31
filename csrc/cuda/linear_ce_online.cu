// CUDA kernels of the online linear cross-entropy for a frozen head (python/sloth/nn/_online_head.py): per
// vocabulary block, the in-place p' = exp(z - m) dz/dx with the running softmax state; per row chunk, the
// loss and dh from the fp32 accumulator acc = sum_v p'_v W_v (the GEMMs run in cuBLAS, driven from Python).
#include <stdint.h>

#include "launchers.h"
#include "sloth/cross_entropy.h"
#include "sloth/numeric.h"
#include "sloth/vec.cuh"

namespace sloth::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

template <OutType T>
using raw_t = typename OutStorage<T>::type;

// One CTA per row of the block logits [rows, vb] (raw x = h W_b^T + b): pass 1 takes the block max of z,
// pass 2 rereads the row (L1 / L2) and overwrites it with p' = exp(z - m_new) dz/dx while summing exp(z -
// m_new); the row's state moves to m_new, and its acc row [H] fp32 is rescaled when m moved. kVec: 8-wide
// accesses (rows 16-byte aligned, vb % 8 == 0). Traffic per row: 2 vb reads + vb writes of T, plus 2 H fp32
// for a rescaled acc row.
template <OutType T, bool kVec>
__global__ void __launch_bounds__(kThreads) ce_online_block_kernel(raw_t<T>* __restrict__ logits, int64_t vb,
                                                                   CeOnlineBlockArgs a) {
  __shared__ float s_warp[kWarps];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  raw_t<T>* row = logits + r * vb;
  const bool first = a.vocab_start == 0;
  const int64_t lab = a.labels[r] - a.vocab_start;  // label's column in this block, if in [0, vb)
  float z_label = 0.0f, d_label = 0.0f;  // thread 0's copy of the row's label state
  if (tid == 0) {
    if (lab >= 0 && lab < vb) {
      z_label = ce_logit(to_float<T>(row[lab]), a.logit_scale, a.softcap);
      d_label = ce_dlogit(z_label, a.logit_scale, a.softcap);
    } else if (!first) {
      z_label = a.state[4 * r + 2];
      d_label = a.state[4 * r + 3];
    }
  }

  float mx = -INFINITY;
  if constexpr (kVec) {
#pragma unroll 2
    for (int64_t j = (int64_t)tid * 8; j < vb; j += kThreads * 8) {
      float x[8];
      load8<T>(row + j, x);
#pragma unroll
      for (int i = 0; i < 8; ++i) mx = fmaxf(mx, ce_logit(x[i], a.logit_scale, a.softcap));
    }
  } else {
    for (int64_t j = tid; j < vb; j += kThreads) mx = fmaxf(mx, ce_logit(to_float<T>(row[j]), a.logit_scale, a.softcap));
  }
  mx = block_reduce<MaxOp>(mx, s_warp);  // its barriers also order the label read above before pass 2
  const float m_old = first ? -INFINITY : a.state[4 * r];
  const float m = ce_online_max(m_old, mx, a.margin);

  float sum = 0.0f;
  if constexpr (kVec) {
    for (int64_t j = (int64_t)tid * 8; j < vb; j += kThreads * 8) {
      float x[8];
      load8<T>(row + j, x);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float z = ce_logit(x[i], a.logit_scale, a.softcap);
        const float e = ce_online_exp(z, m);
        sum += e;
        x[i] = e * ce_dlogit(z, a.logit_scale, a.softcap);
      }
      store8<T>(row + j, x);
    }
  } else {
    for (int64_t j = tid; j < vb; j += kThreads) {
      const float z = ce_logit(to_float<T>(row[j]), a.logit_scale, a.softcap);
      const float e = ce_online_exp(z, m);
      sum += e;
      row[j] = from_float<T>(e * ce_dlogit(z, a.logit_scale, a.softcap));
    }
  }
  sum = block_reduce<SumOp>(sum, s_warp);
  const float alpha = ce_online_rescale(m_old, m);
  if (tid == 0) {
    const float s_old = first ? 0.0f : a.state[4 * r + 1];
    a.state[4 * r] = m;
    a.state[4 * r + 1] = s_old * alpha + sum;
    a.state[4 * r + 2] = z_label;
    a.state[4 * r + 3] = d_label;
  }
  if (first || alpha == 1.0f) return;  // the first block's GEMM writes acc (beta = 0)
  float* acc = a.acc + r * a.H;
  if ((a.H & 3) == 0 && (reinterpret_cast<uintptr_t>(a.acc) & 15u) == 0) {
    float4* acc4 = reinterpret_cast<float4*>(acc);
    for (int64_t j = tid; j < a.H / 4; j += kThreads) {
      float4 v = acc4[j];
      v.x *= alpha, v.y *= alpha, v.z *= alpha, v.w *= alpha;
      acc4[j] = v;
    }
  } else {
    for (int64_t j = tid; j < a.H; j += kThreads) acc[j] *= alpha;
  }
}

// One CTA per row: loss[r] from the state, dh[r, :] = c (acc[r, :] / s - dz/dx_label W[label, :]) in T
// (c = row_scale[r] or 1, 0 on ignored rows, NaN for a label outside [0, V)). Traffic per row: H fp32 (acc) + H T
// (W row) read, H T written.
template <OutType T>
__global__ void __launch_bounds__(kThreads) ce_online_finish_kernel(const raw_t<T>* __restrict__ weight,
                                                                    raw_t<T>* __restrict__ dh, CeOnlineFinishArgs a) {
  const int64_t r = blockIdx.x;
  const CeOnlineState st{a.state[4 * r], a.state[4 * r + 1], a.state[4 * r + 2], a.state[4 * r + 3]};
  const int64_t label = a.labels[r];
  const bool ignored = label == a.ignore_index;
  const bool valid = !ignored && label >= 0 && label < a.V;
  if (threadIdx.x == 0) a.loss[r] = ce_online_loss(st, ignored, valid);
  const float c = ce_row_coef(ignored, valid, a.row_scale ? a.row_scale[r] : 1.0f);  // NaN: a label outside [0, V)
  const float inv_s = c == 0.0f ? 0.0f : c / st.s;
  const float dl = valid ? c * st.d_label : 0.0f;
  const float* acc = a.acc + r * a.H;
  const raw_t<T>* w = weight + (valid ? label : 0) * a.H;
  raw_t<T>* out = dh + r * a.H;
  for (int64_t j = threadIdx.x; j < a.H; j += kThreads) out[j] = from_float<T>(acc[j] * inv_s - dl * to_float<T>(w[j]));
}

}  // namespace

cudaError_t launch_ce_online_block(void* logits, OutType type, int64_t rows, int64_t vb, CeOnlineBlockArgs args,
                            cudaStream_t stream) {
  if (rows == 0 || vb == 0) return cudaSuccess;
  const size_t elem = type == OutType::kF32 ? 4 : 2;
  const bool vec = vb % 8 == 0 && (reinterpret_cast<uintptr_t>(logits) & 15u) == 0 && (vb * elem) % 16 == 0;
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    auto* p = static_cast<raw_t<T>*>(logits);
    if (vec) {
      ce_online_block_kernel<T, true><<<(unsigned)rows, kThreads, 0, stream>>>(p, vb, args);
    } else {
      ce_online_block_kernel<T, false><<<(unsigned)rows, kThreads, 0, stream>>>(p, vb, args);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_ce_online_finish(const void* weight, void* dh, OutType type, int64_t rows, CeOnlineFinishArgs args,
                             cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    ce_online_finish_kernel<T><<<(unsigned)rows, kThreads, 0, stream>>>(static_cast<const raw_t<T>*>(weight),
                                                                        static_cast<raw_t<T>*>(dh), args);
  });
  return cudaGetLastError();
}

}  // namespace sloth::cuda
