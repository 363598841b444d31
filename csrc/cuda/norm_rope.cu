// CUDA kernels for RMSNorm (forward / backward) and RoPE (in place or into a new tensor). Math: csrc/include/sloth/norm_rope.h.
#include <stdint.h>

#include <algorithm>

#include "launchers.h"
#include "sloth/norm_rope.h"
#include "sloth/numeric.h"
#include "sloth/portability.h"
#include "sloth/vec.cuh"

namespace sloth::cuda {
namespace {

constexpr int kMaxThreads = 1024;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// VEC contiguous elements of type T -> fp32 (one 16-byte load when VEC * sizeof(T) == 16).
template <OutType T, int VEC>
__device__ __forceinline__ void loadv(const typename OutStorage<T>::type* src, float (&v)[VEC]) {
  using raw = typename OutStorage<T>::type;
  if constexpr (VEC * sizeof(raw) == 16) {
    unpack16<T>(*reinterpret_cast<const uint4*>(src), v);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float<T>(src[i]);
  }
}

template <OutType T, int VEC>
__device__ __forceinline__ void storev(typename OutStorage<T>::type* dst, const float (&v)[VEC]) {
  using raw = typename OutStorage<T>::type;
  if constexpr (VEC * sizeof(raw) == 16) {
    *reinterpret_cast<uint4*>(dst) = pack16<T>(v);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = from_float<T>(v[i]);
  }
}

// Loop header over this thread's chunks of a row of nvec chunks of VEC elements: for it < ITERS (unrolled, so
// per-chunk register arrays v[it] stay in registers), chunk c = threadIdx.x + it * blockDim.x when inside the row.
// A macro rather than a function taking a lambda: the kernels compile exactly as with the loop written out (a
// lambda version gives the same PTX on nvcc but more VGPRs and new spills from hipcc for gfx90a).
#define SLOTH_FOR_EACH_CHUNK(it, c)                  \
  _Pragma("unroll") for (int it = 0; it < ITERS; ++it) \
    if (const int64_t c = threadIdx.x + (int64_t)it * blockDim.x; c < nvec)

// RMSNorm forward, one CTA per row (grid-stride over rows). Each thread keeps its ITERS chunks of VEC
// elements of x in registers, so x is read once. Traffic per row: reads H (x) + H (w, L2-resident) elements,
// writes H elements of y and 4 bytes of rstd: about 2 H sizeof(T) bytes from / to DRAM.
template <OutType T, int VEC, int ITERS>
__global__ void rms_norm_forward_kernel(const typename OutStorage<T>::type* __restrict__ x,
                                        const typename OutStorage<T>::type* __restrict__ w,
                                        typename OutStorage<T>::type* __restrict__ y, float* __restrict__ rstd,
                                        int64_t rows, int64_t H, float eps, float offset, bool cast_before_weight) {
  __shared__ float red[kMaxThreads / 32];
  const int64_t nvec = H / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const typename OutStorage<T>::type* xr = x + row * H;
    float v[ITERS][VEC];
    float ss = 0.f;
    SLOTH_FOR_EACH_CHUNK(it, c) {
      loadv<T, VEC>(xr + c * VEC, v[it]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) ss += v[it][i] * v[it][i];
    }
    const float rs = rms_norm_rstd(block_reduce<SumOp>(ss, red), H, eps);
    if (threadIdx.x == 0) rstd[row] = rs;
    SLOTH_FOR_EACH_CHUNK(it, c) {
      float wv[VEC], o[VEC];
      loadv<T, VEC>(w + c * VEC, wv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = rms_norm_n<T>(v[it][i], rs, cast_before_weight) * (offset + wv[i]);
      storev<T, VEC>(y + row * H + c * VEC, o);
    }
  }
}

// RMSNorm backward, one CTA per row (grid-stride): dx = rstd (dy g - n D); each CTA sums dy * n' of its rows
// over its columns in registers and writes one fp32 partial row of dw (partial[blockIdx.x, H]), reduced by
// rms_norm_dw_reduce_kernel. Traffic per row: reads 2 H elements (x, dy) + w (L2), writes H elements of dx;
// plus gridDim.x * H * 4 bytes of partials written once and read once.
template <OutType T, int VEC, int ITERS>
__global__ void rms_norm_backward_kernel(const typename OutStorage<T>::type* __restrict__ dy,
                                         const typename OutStorage<T>::type* __restrict__ x,
                                         const typename OutStorage<T>::type* __restrict__ w,
                                         const float* __restrict__ rstd, typename OutStorage<T>::type* __restrict__ dx,
                                         float* __restrict__ partial, int64_t rows, int64_t H, float offset,
                                         bool cast_before_weight) {
  __shared__ float red[kMaxThreads / 32];
  const int64_t nvec = H / VEC;
  float acc[ITERS][VEC];
#pragma unroll
  for (int it = 0; it < ITERS; ++it)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[it][i] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float rs = rstd[row];
    float xv[ITERS][VEC], dv[ITERS][VEC];
    float dot = 0.f;
    SLOTH_FOR_EACH_CHUNK(it, c) {
      float wv[VEC];
      loadv<T, VEC>(x + row * H + c * VEC, xv[it]);
      loadv<T, VEC>(dy + row * H + c * VEC, dv[it]);
      loadv<T, VEC>(w + c * VEC, wv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dot += dv[it][i] * (offset + wv[i]) * (xv[it][i] * rs);
        if (partial) acc[it][i] += dv[it][i] * rms_norm_n<T>(xv[it][i], rs, cast_before_weight);
      }
    }
    dot = block_reduce<SumOp>(dot, red) / (float)H;
    SLOTH_FOR_EACH_CHUNK(it, c) {
      float wv[VEC], o[VEC];
      loadv<T, VEC>(w + c * VEC, wv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = rs * (dv[it][i] * (offset + wv[i]) - xv[it][i] * rs * dot);
      storev<T, VEC>(dx + row * H + c * VEC, o);
    }
  }
  if (partial) {
    SLOTH_FOR_EACH_CHUNK(it, c) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) partial[(int64_t)blockIdx.x * H + c * VEC + i] = acc[it][i];
    }
  }
}

#undef SLOTH_FOR_EACH_CHUNK

// dw[j] = sum_b partial[b, j], in a fixed order (deterministic). Traffic: reads nparts * H * 4, writes H * 4 bytes.
__global__ void rms_norm_dw_reduce_kernel(const float* __restrict__ partial, float* __restrict__ dw, int nparts,
                                          int64_t H) {
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < H; j += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int b = 0; b < nparts; ++b) s += partial[(int64_t)b * H + j];
    dw[j] = s;
  }
}

struct RowPlan {
  int vec = 1, iters = 1, threads = 32;
  bool ok = false;
};

// Chunks of VEC (16 bytes when aligned and H % VEC == 0, else 1 element), ITERS chunks per thread held in
// registers, at most kMaxThreads threads.
RowPlan plan_rows(int64_t H, int elem_bytes, bool aligned) {
  RowPlan p;
  const int v16 = 16 / elem_bytes;
  p.vec = (aligned && H % v16 == 0) ? v16 : 1;
  const int64_t nvec = H / p.vec;
  const int options[] = {1, 2, 4, 8, 16};
  for (int it : options) {
    if (p.vec > 1 && it > 8) break;
    const int64_t per = (nvec + it - 1) / it;
    if (per <= 256 || (it == (p.vec > 1 ? 8 : 16) && per <= kMaxThreads)) {
      p.iters = it;
      p.threads = (int)((per + kWarpSize - 1) / kWarpSize * kWarpSize);  // whole warps / wavefronts: block_sum
      p.ok = true;
      return p;
    }
  }
  return p;
}

template <OutType T, typename Fn>
bool dispatch_plan(const RowPlan& p, Fn&& fn) {
  constexpr int V16 = 16 / sizeof(typename OutStorage<T>::type);
#define SLOTH_PLAN_CASE(VEC, IT) \
  if (p.vec == VEC && p.iters == IT) { fn(std::integral_constant<int, VEC>{}, std::integral_constant<int, IT>{}); return true; }
  SLOTH_PLAN_CASE(V16, 1) SLOTH_PLAN_CASE(V16, 2) SLOTH_PLAN_CASE(V16, 4) SLOTH_PLAN_CASE(V16, 8)
  SLOTH_PLAN_CASE(1, 1) SLOTH_PLAN_CASE(1, 2) SLOTH_PLAN_CASE(1, 4) SLOTH_PLAN_CASE(1, 8) SLOTH_PLAN_CASE(1, 16)
#undef SLOTH_PLAN_CASE
  return false;
}

int elem_bytes(OutType t) { return t == OutType::kF32 ? 4 : 2; }

unsigned row_grid(int64_t rows, int64_t cap) { return (unsigned)(rows < cap ? (rows > 0 ? rows : 1) : cap); }

// RoPE, generic layout: one thread per rotary pair (token, head, i < rot_dim / 2); adjacent threads take
// adjacent i, so the loads of src[i], src[i + h], cos and sin are coalesced. dst may be src (in place); each
// pair is read before it is written by the same thread. Traffic: reads and writes rot_dim elements per
// (token, head); cos / sin (rot_dim fp32 per token) are read once per head from L2. Used where the layout does
// not allow rope_vec_kernel's 16-byte accesses.
template <OutType T>
__global__ void rope_kernel(const typename OutStorage<T>::type* src, int64_t src_t, int64_t src_h,
                            typename OutStorage<T>::type* dst, int64_t dst_t, int64_t dst_h,
                            const float* __restrict__ cos, const float* __restrict__ sin, int64_t tokens,
                            int64_t heads, int64_t half, bool inverse) {
  const int64_t n = tokens * heads * half;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % half, th = i / half, h = th % heads, t = th / heads;
    const typename OutStorage<T>::type* v = src + t * src_t + h * src_h;
    typename OutStorage<T>::type* o = dst + t * dst_t + h * dst_h;
    const float* c = cos + t * 2 * half;
    const float* s = sin + t * 2 * half;
    const RopePair p = rope_pair(to_float<T>(v[j]), to_float<T>(v[j + half]), c[j], c[j + half], s[j], s[j + half],
                                 inverse);
    o[j] = from_float<T>(p.a);
    o[j + half] = from_float<T>(p.b);
  }
}

// RoPE, vectorized (used wherever its layout conditions hold). Layout: block (x: nchunk = half / VEC chunks of
// the first half, y: hs head slots, z: tpb tokens); the thread of chunk c rotates pairs (j, j + half),
// j in [c VEC, c VEC + VEC), of token t for heads y, y + hs, ..., HPT heads per step (all their loads issued
// before any store, so dst may be src); cos / sin of its chunk (4 VEC fp32) stay in registers for all its
// heads. 32-bit indices except the final 64-bit address products; no division. Needs half % VEC == 0 and
// 16-byte aligned src, dst, their token / head strides (in bytes), cos and sin: rope_vec_plan.
// Traffic: reads + writes rot_dim elements per (token, head), cos / sin from L2 (about 3.3 TB/s on an H200,
// benchmarks/NOTES.md).
template <OutType T, int VEC, int HPT>
__global__ void rope_vec_kernel(const typename OutStorage<T>::type* src, int64_t src_t, int64_t src_h,
                                typename OutStorage<T>::type* dst, int64_t dst_t, int64_t dst_h,
                                const float* __restrict__ cos, const float* __restrict__ sin, int tokens, int heads,
                                int half, bool inverse) {
  using raw = typename OutStorage<T>::type;
  const int t = blockIdx.x * blockDim.z + threadIdx.z;
  if (t >= tokens) return;
  const int j = threadIdx.x * VEC, hs = blockDim.y;
  float c1[VEC], c2[VEC], s1[VEC], s2[VEC];
  {
    const float* c = cos + (int64_t)t * (2 * half) + j;
    const float* s = sin + (int64_t)t * (2 * half) + j;
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(c + i), b = *reinterpret_cast<const float4*>(c + half + i);
      const float4 d = *reinterpret_cast<const float4*>(s + i), e = *reinterpret_cast<const float4*>(s + half + i);
      c1[i] = a.x, c1[i + 1] = a.y, c1[i + 2] = a.z, c1[i + 3] = a.w;
      c2[i] = b.x, c2[i + 1] = b.y, c2[i + 2] = b.z, c2[i + 3] = b.w;
      s1[i] = d.x, s1[i + 1] = d.y, s1[i + 2] = d.z, s1[i + 3] = d.w;
      s2[i] = e.x, s2[i + 1] = e.y, s2[i + 2] = e.z, s2[i + 3] = e.w;
    }
  }
  const raw* in = src + (int64_t)t * src_t + j;
  raw* out = dst + (int64_t)t * dst_t + j;
  for (int h0 = threadIdx.y; h0 < heads; h0 += HPT * hs) {
    uint4 w1[HPT], w2[HPT];  // raw words until the math: 4 registers per VEC elements
#pragma unroll
    for (int k = 0; k < HPT; ++k) {
      const int h = h0 + k * hs;
      if (h < heads) {
        const raw* v = in + (int64_t)h * src_h;
        w1[k] = *reinterpret_cast<const uint4*>(v);
        w2[k] = *reinterpret_cast<const uint4*>(v + half);
      }
    }
#pragma unroll
    for (int k = 0; k < HPT; ++k) {
      const int h = h0 + k * hs;
      if (h < heads) {
        float a[VEC], b[VEC];
        unpack16<T>(w1[k], a);
        unpack16<T>(w2[k], b);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const RopePair p = rope_pair(a[i], b[i], c1[i], c2[i], s1[i], s2[i], inverse);
          a[i] = p.a, b[i] = p.b;
        }
        raw* v = out + (int64_t)h * dst_h;
        *reinterpret_cast<uint4*>(v) = pack16<T>(a);
        *reinterpret_cast<uint4*>(v + half) = pack16<T>(b);
      }
    }
  }
}

constexpr int kRopeHpt = 4;  // heads per thread per step of rope_vec_kernel

struct RopeVecPlan {
  dim3 grid, block;
  bool ok = false;
};

// Launch shape of rope_vec_kernel, or ok = false (use rope_kernel) when the layout does not allow 16-byte
// accesses or the sizes do not fit its 32-bit indices. ~256 threads: nchunk x hs x tpb.
RopeVecPlan rope_vec_plan(const RopeLayout& l, int elem) {
  RopeVecPlan p;
  const int64_t vec = 16 / elem, half = l.rot_dim / 2;
  auto stride_ok = [&](int64_t st, int64_t sh) {
    return (l.tokens == 1 || st % vec == 0) && (l.heads == 1 || sh % vec == 0);
  };
  if (half % vec != 0 || !stride_ok(l.src_t, l.src_h) || !stride_ok(l.dst_t, l.dst_h) || !aligned16(l.src) ||
      !aligned16(l.dst) || !aligned16(l.cos) || !aligned16(l.sin))
    return p;
  const int64_t nchunk = half / vec;
  if (nchunk > 256 || l.tokens > (int64_t)INT32_MAX - 64 || l.heads > (int64_t)INT32_MAX - kRopeHpt * 256) return p;
  const int64_t slots_cap = 256 / nchunk;
  const int64_t hs = std::min<int64_t>((l.heads + kRopeHpt - 1) / kRopeHpt, slots_cap);
  const int64_t tpb = std::max<int64_t>(1, std::min<int64_t>({64, 256 / (nchunk * hs), l.tokens}));
  p.block = dim3((unsigned)nchunk, (unsigned)hs, (unsigned)tpb);
  p.grid = dim3((unsigned)((l.tokens + tpb - 1) / tpb));
  p.ok = true;
  return p;
}

}  // namespace

int rms_norm_backward_parts(int64_t rows) {
  int dev = 0, sms = 108;
  if (cudaGetDevice(&dev) == cudaSuccess) (void)cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t cap = 2 * (int64_t)sms;
  return (int)(rows < cap ? (rows > 0 ? rows : 1) : cap);
}

cudaError_t launch_rms_norm_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t H,
                             OutType type, float eps, float offset, bool cast_before_weight, cudaStream_t stream) {
  if (rows == 0 || H == 0) return cudaSuccess;
  const RowPlan p = plan_rows(H, elem_bytes(type), aligned16(x) && aligned16(w) && aligned16(y));
  if (!p.ok) return cudaErrorNotSupported;
  bool launched = false;
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    launched = dispatch_plan<T>(p, [&](auto vc, auto ic) {
      constexpr int VEC = decltype(vc)::value, IT = decltype(ic)::value;
      rms_norm_forward_kernel<T, VEC, IT><<<row_grid(rows, 65535), p.threads, 0, stream>>>(
          static_cast<const raw*>(x), static_cast<const raw*>(w), static_cast<raw*>(y), rstd, rows, H, eps, offset,
          cast_before_weight);
    });
  });
  if (!launched) return cudaErrorNotSupported;
  return cudaGetLastError();
}

cudaError_t launch_rms_norm_backward(const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                              float* dw, float* partial, int nparts, int64_t rows, int64_t H, OutType type,
                              float offset, bool cast_before_weight, cudaStream_t stream) {
  if (H == 0) return cudaSuccess;
  if (rows == 0) {
    if (dw) return cudaMemsetAsync(dw, 0, H * sizeof(float), stream);
    return cudaSuccess;
  }
  const RowPlan p = plan_rows(H, elem_bytes(type), aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx));
  if (!p.ok) return cudaErrorNotSupported;
  bool launched = false;
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    launched = dispatch_plan<T>(p, [&](auto vc, auto ic) {
      constexpr int VEC = decltype(vc)::value, IT = decltype(ic)::value;
      rms_norm_backward_kernel<T, VEC, IT><<<(unsigned)nparts, p.threads, 0, stream>>>(
          static_cast<const raw*>(dy), static_cast<const raw*>(x), static_cast<const raw*>(w), rstd,
          static_cast<raw*>(dx), dw ? partial : nullptr, rows, H, offset, cast_before_weight);
    });
  });
  if (!launched) return cudaErrorNotSupported;
  if (dw) {
    const unsigned grid = row_grid((H + 255) / 256, 65535);
    rms_norm_dw_reduce_kernel<<<grid, 256, 0, stream>>>(partial, dw, nparts, H);
  }
  return cudaGetLastError();
}

cudaError_t launch_rope(const RopeLayout& l, OutType type, bool inverse, cudaStream_t stream) {
  const int64_t half = l.rot_dim / 2;
  if (l.tokens * l.heads * half == 0) return cudaSuccess;
  const RopeVecPlan p = rope_vec_plan(l, elem_bytes(type));
  dispatch_out_type(type, [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* src = static_cast<const raw*>(l.src);
    raw* dst = static_cast<raw*>(l.dst);
    if (p.ok) {
      rope_vec_kernel<T, 16 / sizeof(raw), kRopeHpt><<<p.grid, p.block, 0, stream>>>(
          src, l.src_t, l.src_h, dst, l.dst_t, l.dst_h, l.cos, l.sin, (int)l.tokens, (int)l.heads, (int)half,
          inverse);
    } else {
      const unsigned grid = row_grid((l.tokens * l.heads * half + 255) / 256, 65535 * 8);  // grid-stride loop
      rope_kernel<T><<<grid, 256, 0, stream>>>(src, l.src_t, l.src_h, dst, l.dst_t, l.dst_h, l.cos, l.sin,
                                              l.tokens, l.heads, half, inverse);
    }
  });
  return cudaGetLastError();
}

}  // namespace sloth::cuda
