// CUDA kernel of the chunked linear cross-entropy: softmax statistics, per-row loss and the in-place
// logit gradient of one chunk of logits (the GEMMs around it run in cuBLAS, driven from Python).
#include <stdint.h>

#include "launchers.h"
#include "sloth/cross_entropy.h"
#include "sloth/numeric.h"
#include "sloth/vec.cuh"

namespace sloth::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread: 512 x 4 x 16 B = 32 KiB per CTA
constexpr int kWarps = kThreads / kWarpSize;

// Adds n logits at once: one rescale for the group's max, then one exp per element.
template <int N>
__device__ __forceinline__ void add_group(CeState& st, const float (&z)[N]) {
  float mx = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) mx = fmaxf(mx, z[i]);
  if (mx == -INFINITY) return;
  if (mx > st.m) {
    const float r = ce_exp(st.m - mx);  // 0 when st.m == -inf
    st.s *= r;
    st.t *= r;
    st.m = mx;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float e = ce_exp(z[i] - st.m);
    st.s += e;
    st.t += e == 0.0f ? 0.0f : e * z[i];  // z = -inf contributes nothing (not NaN)
  }
}

__device__ __forceinline__ CeState shfl_state(const CeState& st, int mask) {
  return CeState{shfl_xor(st.m, mask), shfl_xor(st.s, mask), shfl_xor(st.t, mask)};
}

// A row of V logits split for 16-byte access: a scalar head [0, head) up to 16-byte alignment, a body of nvec
// 16-byte vectors from element head, a scalar tail [tail0, V).
struct RowSplit {
  int64_t head, nvec, tail0;
};

template <OutType T>
__device__ __forceinline__ RowSplit split_row(const typename OutStorage<T>::type* row, int64_t V) {
  using raw = typename OutStorage<T>::type;
  constexpr int N = kVec16<T>;
  const int64_t mis = (int64_t)(reinterpret_cast<uintptr_t>(row) & 15u);
  int64_t head = mis == 0 ? 0 : (16 - mis) / (int64_t)sizeof(raw);
  if (head > V) head = V;
  const int64_t nvec = (V - head) / N;
  return RowSplit{head, nvec, head + nvec * N};
}

// One CTA's traversal of a row, each element once, as fp32: scalar(j, x) on the head and the tail (scalar
// loads), then vector(j0, x[N]) on each 16-byte vector of the body (elements j0 .. j0 + N - 1; kUnroll loads
// in flight per thread). kWrite: each element is overwritten in place with scalar's return value, or with
// what vector left in x (16-byte stores). Traffic: V * sizeof(T) read, plus as much written with kWrite.
template <OutType T, bool kWrite, typename Scalar, typename Vector>
__device__ __forceinline__ void for_each_in_row(typename OutStorage<T>::type* row, int64_t V, const RowSplit& sp,
                                                Scalar&& scalar, Vector&& vector) {
  constexpr int N = kVec16<T>;
  const int tid = threadIdx.x;
  uint4* body = reinterpret_cast<uint4*>(row + sp.head);
  const auto one = [&](int64_t j) {
    if constexpr (kWrite) row[j] = from_float<T>(scalar(j, to_float<T>(row[j])));
    else scalar(j, to_float<T>(row[j]));
  };
  for (int64_t j = tid; j < sp.head; j += kThreads) one(j);
  for (int64_t j = sp.tail0 + tid; j < V; j += kThreads) one(j);
  for (int64_t v0 = 0; v0 < sp.nvec; v0 += (int64_t)kThreads * kUnroll) {
    uint4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = v0 + (int64_t)u * kThreads + tid;
      if (idx < sp.nvec) buf[u] = body[idx];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = v0 + (int64_t)u * kThreads + tid;
      if (idx < sp.nvec) {
        float z[N];
        unpack16<T>(buf[u], z);
        vector(sp.head + idx * N, z);
        if constexpr (kWrite) body[idx] = pack16<T>(z);
      }
    }
  }
}

// One CTA per row of logits [rows, V]: pass 1 reads the row (16-byte loads, scalar head / tail to reach
// alignment) into the online state (max, sum exp, sum exp * z) in fp32; loss, lse, entropy per row; pass 2
// (compute_grad) rereads the row and overwrites it in place with the gradient.
// Traffic per row: V * sizeof(T) read (loss only), or 2 x V * sizeof(T) read + V * sizeof(T) written; the
// reread mostly hits L2 since a chunk of logits (<= ~32 MiB) was just written there by the GEMM.
template <OutType T>
__global__ void __launch_bounds__(kThreads) cross_entropy_chunk_kernel(typename OutStorage<T>::type* __restrict__ logits,
                                                                       int64_t V, CeChunkArgs a) {
  using raw = typename OutStorage<T>::type;
  constexpr int N = kVec16<T>;
  __shared__ CeState s_warp[kWarps];
  __shared__ CeState s_row;
  __shared__ float s_zlabel;

  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  raw* row = logits + r * V;
  const int64_t label = a.labels[r];
  const bool ignored = label == a.ignore_index;
  const bool valid = !ignored && label >= 0 && label < V;
  if (tid == 0) s_zlabel = valid ? ce_logit(to_float<T>(row[label]), a.logit_scale, a.softcap) : 0.0f;

  const RowSplit sp = split_row<T>(row, V);

  // Pass 1: the online state of this thread's logits.
  CeState st = ce_state_empty();
  for_each_in_row<T, false>(
      row, V, sp, [&](int64_t, float x) { ce_state_add(st, ce_logit(x, a.logit_scale, a.softcap)); },
      [&](int64_t, float (&z)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) z[i] = ce_logit(z[i], a.logit_scale, a.softcap);
        add_group<N>(st, z);
      });

  // Block reduction of the online states.
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) st = ce_state_merge(st, shfl_state(st, m));
  if (tid % kWarpSize == 0) s_warp[tid / kWarpSize] = st;
  __syncthreads();
  if (tid < kWarpSize) {
    st = tid < kWarps ? s_warp[tid] : ce_state_empty();
#pragma unroll
    for (int m = kWarpSize / 2; m > 0; m >>= 1) st = ce_state_merge(st, shfl_state(st, m));
    if (tid == 0) s_row = st;
  }
  __syncthreads();
  st = s_row;
  const float lse = ce_lse(st), mean_z = ce_mean_logit(st);
  if (tid == 0) {
    a.loss[r] = valid ? lse - s_zlabel : (ignored ? 0.0f : __int_as_float(0x7fc00000));  // NaN: bad label
    a.lse[r] = lse;
    a.entropy[r] = lse - mean_z;
  }
  if (!a.compute_grad) return;

  // Pass 2: the gradient, in place.
  const float c_nll = ce_row_coef(ignored, valid, a.grad_scale * (a.grad_nll ? a.grad_nll[r] : 1.0f));
  const float c_ent = ignored ? 0.0f : a.grad_scale * (a.grad_entropy ? a.grad_entropy[r] : 0.0f);
  for_each_in_row<T, true>(
      row, V, sp,
      [&](int64_t j, float x) {
        const float z = ce_logit(x, a.logit_scale, a.softcap);
        return ce_grad(z, j == label, lse, mean_z, c_nll, c_ent, a.logit_scale, a.softcap);
      },
      [&](int64_t j0, float (&z)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float zi = ce_logit(z[i], a.logit_scale, a.softcap);
          z[i] = ce_grad(zi, j0 + i == label, lse, mean_z, c_nll, c_ent, a.logit_scale, a.softcap);
        }
      });
}

}  // namespace

cudaError_t launch_cross_entropy_chunk(void* logits, OutType type, int64_t rows, int64_t V, CeChunkArgs args,
                                cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    cross_entropy_chunk_kernel<T><<<(unsigned)rows, kThreads, 0, stream>>>(
        static_cast<typename OutStorage<T>::type*>(logits), V, args);
  });
  return cudaGetLastError();
}

}  // namespace sloth::cuda
