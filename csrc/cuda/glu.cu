// CUDA kernels for the fused GLU activations (SwiGLU / GeGLU): forward and in-place backward.
#include "launchers.h"
#include "sloth/glu.h"
#include "sloth/numeric.h"
#include "sloth/vec.cuh"

namespace sloth::cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride loop shared by the kernels below: f(i) for i in [start, n), kThreads-strided per CTA.
template <typename F>
__device__ __forceinline__ void grid_stride(int64_t start, int64_t n, F&& f) {
  for (int64_t i = start + (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += (int64_t)gridDim.x * kThreads)
    f(i);
}

// h = act(gate) * up over n elements, 8 per thread per step (16- or 32-byte loads and stores).
// Traffic: reads 2 n * sizeof(T), writes n * sizeof(T).
template <OutType T, GluKind K>
__global__ void __launch_bounds__(kThreads) glu_forward_vec_kernel(const typename OutStorage<T>::type* __restrict__ gate,
                                                                   const typename OutStorage<T>::type* __restrict__ up,
                                                                   typename OutStorage<T>::type* __restrict__ out,
                                                                   int64_t n_vec) {
  grid_stride(0, n_vec, [&](int64_t v) {
    float g[8], u[8], h[8];
    load8<T>(gate + v * 8, g);
    load8<T>(up + v * 8, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = glu_fwd<K>(g[i], u[i]);
    store8<T>(out + v * 8, h);
  });
}

// Element-wise forward for the tail (n % 8) and unaligned tensors. Traffic: as the vector kernel.
template <OutType T, GluKind K>
__global__ void glu_forward_scalar_kernel(const typename OutStorage<T>::type* __restrict__ gate,
                                          const typename OutStorage<T>::type* __restrict__ up,
                                          typename OutStorage<T>::type* __restrict__ out, int64_t start, int64_t n) {
  grid_stride(start, n,
              [&](int64_t i) { out[i] = from_float<T>(glu_fwd<K>(to_float<T>(gate[i]), to_float<T>(up[i]))); });
}

// In place: gate <- dh * up * act'(gate), up <- dh * act(gate), 8 per thread per step.
// Traffic: reads 3 n * sizeof(T), writes 2 n * sizeof(T).
template <OutType T, GluKind K>
__global__ void __launch_bounds__(kThreads) glu_backward_vec_kernel(const typename OutStorage<T>::type* __restrict__ grad,
                                                                    typename OutStorage<T>::type* __restrict__ gate,
                                                                    typename OutStorage<T>::type* __restrict__ up,
                                                                    int64_t n_vec) {
  grid_stride(0, n_vec, [&](int64_t v) {
    float d[8], g[8], u[8], dg[8], du[8];
    load8<T>(grad + v * 8, d);
    load8<T>(gate + v * 8, g);
    load8<T>(up + v * 8, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const GluGrad a = glu_act<K>(g[i]);
      dg[i] = d[i] * u[i] * a.dact;
      du[i] = d[i] * a.act;
    }
    store8<T>(gate + v * 8, dg);
    store8<T>(up + v * 8, du);
  });
}

// Element-wise backward for the tail and unaligned tensors. Traffic: as the vector kernel.
template <OutType T, GluKind K>
__global__ void glu_backward_scalar_kernel(const typename OutStorage<T>::type* __restrict__ grad,
                                           typename OutStorage<T>::type* __restrict__ gate,
                                           typename OutStorage<T>::type* __restrict__ up, int64_t start, int64_t n) {
  grid_stride(start, n, [&](int64_t i) {
    const float d = to_float<T>(grad[i]), g = to_float<T>(gate[i]), u = to_float<T>(up[i]);
    const GluGrad a = glu_act<K>(g);
    gate[i] = from_float<T>(d * u * a.dact);
    up[i] = from_float<T>(d * a.act);
  });
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned grid_for(int64_t items) {
  const int64_t g = (items + kThreads - 1) / kThreads;
  return (unsigned)(g < 65535 * 8 ? (g > 0 ? g : 1) : 65535 * 8);  // grid-stride loops cover the rest
}

}  // namespace

cudaError_t launch_glu_forward(const void* gate, const void* up, void* out, int64_t n, OutType type, int kind,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  bool known = true;
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* g = static_cast<const raw*>(gate);
    const raw* u = static_cast<const raw*>(up);
    raw* o = static_cast<raw*>(out);
    known = dispatch_glu_kind(kind, [&](auto k) {
      constexpr GluKind K = decltype(k)::value;
      const int64_t n_vec = (aligned16(g) && aligned16(u) && aligned16(o)) ? n / 8 : 0;
      if (n_vec > 0) glu_forward_vec_kernel<T, K><<<grid_for(n_vec), kThreads, 0, stream>>>(g, u, o, n_vec);
      if (n - n_vec * 8 > 0)
        glu_forward_scalar_kernel<T, K><<<grid_for(n - n_vec * 8), kThreads, 0, stream>>>(g, u, o, n_vec * 8, n);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t launch_glu_backward(const void* grad, void* gate, void* up, int64_t n, OutType type, int kind,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  bool known = true;
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* d = static_cast<const raw*>(grad);
    raw* g = static_cast<raw*>(gate);
    raw* u = static_cast<raw*>(up);
    known = dispatch_glu_kind(kind, [&](auto k) {
      constexpr GluKind K = decltype(k)::value;
      const int64_t n_vec = (aligned16(d) && aligned16(g) && aligned16(u)) ? n / 8 : 0;
      if (n_vec > 0) glu_backward_vec_kernel<T, K><<<grid_for(n_vec), kThreads, 0, stream>>>(d, g, u, n_vec);
      if (n - n_vec * 8 > 0)
        glu_backward_scalar_kernel<T, K><<<grid_for(n - n_vec * 8), kThreads, 0, stream>>>(d, g, u, n_vec * 8, n);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace sloth::cuda
