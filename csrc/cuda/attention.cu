// CUDA kernels of attention with per-head sinks, sliding window, softcap, GQA and packed documents
// (FlashAttention-2 style tiling on tensor cores: mma.sync m16n8k16 with fp32 accumulation).
//
// Forward: one CTA per (query block, q head, document); each warp owns 16 query rows and streams the key / value
// blocks its rows can see (causal and window bounds skip the rest), keeping an online softmax whose initial state
// is the sink (m = sink, l = 1). Backward: a preprocess kernel (delta = rowsum(dO * O) and dsinks), then one CTA per
// (key block, kv head, document) that walks the query blocks of every q head of its group seeing those keys,
// accumulating dK / dV in registers and adding dQ into an fp32 buffer with atomics.
// HIP: the tensor-core, ldmatrix and cp.async primitives have portable (slow) equivalents below.
#include <math.h>
#include <stdint.h>

#if !defined(__HIP_PLATFORM_AMD__) && !defined(__HIP_PLATFORM_HCC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "attention.h"
#include "sloth/attention.h"
#include "sloth/numeric.h"
#include "sloth/portability.h"

namespace sloth::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = 8;  // smem row padding (elements): rows 16 bytes apart in banks, conflict-free fragments

// ---------------------------------------------------------------- primitives (one 32-lane group = one "warp")

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if defined(SLOTH_HIP)
  const uint16_t a = kBf16 ? float_to_bf16_bits(lo) : float_to_fp16_bits(lo);
  const uint16_t b = kBf16 ? float_to_bf16_bits(hi) : float_to_fp16_bits(hi);
  return (uint32_t)a | ((uint32_t)b << 16);
#else
  if constexpr (kBf16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
#endif
}

template <bool kBf16>
__device__ __forceinline__ float to_f(uint16_t x) {
  return kBf16 ? bf16_bits_to_float(x) : fp16_bits_to_float(x);
}

#if defined(SLOTH_HIP)
template <bool kBf16>
__device__ __forceinline__ float dot2(uint32_t x, uint32_t y) {
  return to_f<kBf16>((uint16_t)(x & 0xffffu)) * to_f<kBf16>((uint16_t)(y & 0xffffu)) +
         to_f<kBf16>((uint16_t)(x >> 16)) * to_f<kBf16>((uint16_t)(y >> 16));
}
__device__ __forceinline__ uint32_t shfl32(uint32_t v, int src) { return (uint32_t)__shfl((int)v, src, 32); }
#endif

// c[16x8] += a[16x16] b[16x8] with the PTX fragment layouts of mma.m16n8k16 (row.col), fp32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(SLOTH_HIP)
  const int lane = lane_id();
  for (int q = 0; q < 4; ++q) {
    const int sa = (lane & ~3) + q;
    const uint32_t a0 = shfl32(a[0], sa), a1 = shfl32(a[1], sa), a2 = shfl32(a[2], sa), a3 = shfl32(a[3], sa);
    for (int nn = 0; nn < 2; ++nn) {
      const int sb = 4 * (2 * (lane & 3) + nn) + q;
      const uint32_t b0 = shfl32(b[0], sb), b1 = shfl32(b[1], sb);
      c[nn] += dot2<kBf16>(a0, b0) + dot2<kBf16>(a2, b1);
      c[2 + nn] += dot2<kBf16>(a1, b0) + dot2<kBf16>(a3, b1);
    }
  }
#else
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// 2^x with the hardware's approximation (relative error ~2^-22; -inf -> 0).
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(SLOTH_HIP)
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

#if !defined(SLOTH_HIP)
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
#endif

// A fragment (16 x 16) of a row-major smem tile s[row][col] (pitch elements): rows r0.., cols k0..
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const uint16_t* s, int pitch, int r0, int k0) {
  const int lane = lane_id();
#if defined(SLOTH_HIP)
  const int r = r0 + lane / 4, c = k0 + 2 * (lane & 3);
  a[0] = *reinterpret_cast<const uint32_t*>(s + r * pitch + c);
  a[1] = *reinterpret_cast<const uint32_t*>(s + (r + 8) * pitch + c);
  a[2] = *reinterpret_cast<const uint32_t*>(s + r * pitch + c + 8);
  a[3] = *reinterpret_cast<const uint32_t*>(s + (r + 8) * pitch + c + 8);
#else
  const uint16_t* p = s + (r0 + (lane & 15)) * pitch + k0 + (lane >> 4) * 8;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(smem_u32(p)));
#endif
}

// B fragments (16 x 8) of two n-tiles n0, n0 + 8 when B[k][n] = s[n][k] (smem rows are n): b0 = tile n0, b1 = n0+8.
__device__ __forceinline__ void frag_b_nk(uint32_t (&b0)[2], uint32_t (&b1)[2], const uint16_t* s, int pitch, int n0,
                                          int k0) {
  const int lane = lane_id();
#if defined(SLOTH_HIP)
  const int n = n0 + lane / 4, c = k0 + 2 * (lane & 3);
  b0[0] = *reinterpret_cast<const uint32_t*>(s + n * pitch + c);
  b0[1] = *reinterpret_cast<const uint32_t*>(s + n * pitch + c + 8);
  b1[0] = *reinterpret_cast<const uint32_t*>(s + (n + 8) * pitch + c);
  b1[1] = *reinterpret_cast<const uint32_t*>(s + (n + 8) * pitch + c + 8);
#else
  const int m = lane >> 3;
  const uint16_t* p = s + (n0 + (m >> 1) * 8 + (lane & 7)) * pitch + k0 + (m & 1) * 8;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b0[0]), "=r"(b0[1]), "=r"(b1[0]), "=r"(b1[1])
               : "r"(smem_u32(p)));
#endif
}

// B fragments of two n-tiles n0, n0 + 8 when B[k][n] = s[k][n] (smem rows are k): transposing loads.
__device__ __forceinline__ void frag_b_kn(uint32_t (&b0)[2], uint32_t (&b1)[2], const uint16_t* s, int pitch, int k0,
                                          int n0) {
  const int lane = lane_id();
#if defined(SLOTH_HIP)
  const int n = n0 + lane / 4, k = k0 + 2 * (lane & 3);
  auto pair = [&](int kk, int nn) {
    return (uint32_t)s[kk * pitch + nn] | ((uint32_t)s[(kk + 1) * pitch + nn] << 16);
  };
  b0[0] = pair(k, n);
  b0[1] = pair(k + 8, n);
  b1[0] = pair(k, n + 8);
  b1[1] = pair(k + 8, n + 8);
#else
  const uint16_t* p = s + (k0 + (lane & 15)) * pitch + n0 + (lane >> 4) * 8;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b0[0]), "=r"(b0[1]), "=r"(b1[0]), "=r"(b1[1])
               : "r"(smem_u32(p)));
#endif
}

// 16-byte global -> smem copy (zero-filled when !valid), asynchronous where the hardware has it.
__device__ __forceinline__ void copy16(uint16_t* dst, const uint16_t* src, bool valid) {
#if defined(SLOTH_HIP)
  *reinterpret_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void copy_commit() {
#if !defined(SLOTH_HIP)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void copy_wait_all() {
#if !defined(SLOTH_HIP)
  asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}
__device__ __forceinline__ void copy_commit_wait() {
  copy_commit();
  copy_wait_all();
}

// Copy rows [0, rows) of a [rows, D] tile whose row r is at g + (row0 + r) * st (rows >= valid_rows zero-filled).
template <int D, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* s, const uint16_t* g, int64_t st, int row0, int rows,
                                          int valid_rows) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, x = (c % kChunks) * 8;
    const bool ok = r < valid_rows;
    copy16(s + r * (D + kPad) + x, ok ? g + (int64_t)(row0 + r) * st + x : g, ok);
  }
}

// p[0] += x, p[1] += y atomically (one vector atomic on sm_90; p 8-byte aligned).
__device__ __forceinline__ void add2(float* p, float x, float y) {
#if !defined(SLOTH_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

struct Doc {
  int64_t start_q, start_k;  // token offsets (0 when dense)
  int Lq, Lk;
};

__device__ __forceinline__ Doc doc_of(const AttnFwdArgs& a, int b) {
  Doc d;
  if (a.cu_q) {
    d.start_q = a.cu_q[b];
    d.start_k = a.cu_k[b];
    d.Lq = a.cu_q[b + 1] - a.cu_q[b];
    d.Lk = a.cu_k[b + 1] - a.cu_k[b];
  } else {
    d.start_q = d.start_k = 0;
    d.Lq = a.Sq;
    d.Lk = a.Sk;
  }
  return d;
}

__device__ __forceinline__ float score_log2(float s, float scale, float softcap, float inv_cap, bool kSoftcap) {
  const float x = s * scale;
  return (kSoftcap ? softcap * tanhf(x * inv_cap) : x) * kLog2e;
}

// ---------------------------------------------------------------- forward

// out [rows, D] and lse of one (query block, q head, document). Traffic: reads the Q block once and every K / V
// block its rows see once, writes the out block and its lse.
template <bool kBf16, int D, int kWarps, int BN, int kStages, bool kSoftcap>
__global__ void __launch_bounds__(kWarps * 32, D == 64 ? 2 : 1) attn_fwd_kernel(const AttnFwdArgs a) {
  constexpr int BM = kWarps * 16, kThreads = kWarps * 32, P = D + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* Qs = smem;                     // [BM][P]
  uint16_t* KVs = Qs + BM * P;             // kStages x (K [BN][P], V [BN][P])

  const int b = blockIdx.z, h = blockIdx.y, hk = h / (a.Hq / a.Hkv);
  const Doc doc = doc_of(a, b);
  const int i0 = blockIdx.x * BM;
  if (i0 >= doc.Lq) return;
  const AttnMask mask{(int64_t)doc.Lk - doc.Lq, doc.Lk, a.window, a.causal};
  const int i1 = min(i0 + BM, doc.Lq);
  const int kb = (int)mask.key_begin(i0), ke = (int)mask.key_end(i1);

  const uint16_t* qg = static_cast<const uint16_t*>(a.q) + b * a.q_s.sb + doc.start_q * a.q_s.st + h * a.q_s.sh;
  const uint16_t* kg = static_cast<const uint16_t*>(a.k) + b * a.k_s.sb + doc.start_k * a.k_s.st + hk * a.k_s.sh;
  const uint16_t* vg = static_cast<const uint16_t*>(a.v) + b * a.v_s.sb + doc.start_k * a.v_s.st + hk * a.v_s.sh;

  const int warp = threadIdx.x / 32, lane = lane_id();
  const int r_lo = warp * 16 + lane / 4;  // this thread's rows in the block: r_lo, r_lo + 8
  const float inv_cap = kSoftcap ? 1.f / a.softcap : 0.f;
  const float sink = a.sinks ? a.sinks[h] * kLog2e : -INFINITY;
  float m[2] = {sink, sink};
  float l[2] = {a.sinks && (lane & 3) == 0 ? 1.f : 0.f, a.sinks && (lane & 3) == 0 ? 1.f : 0.f};
  float acc[D / 8][4];
#pragma unroll
  for (int t = 0; t < D / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  const int jfirst = (kb / BN) * BN;
  load_tile<D, kThreads>(Qs, qg, a.q_s.st, i0, BM, doc.Lq - i0);
  if (jfirst < ke) {
    load_tile<D, kThreads>(KVs, kg, a.k_s.st, jfirst, BN, doc.Lk - jfirst);
    load_tile<D, kThreads>(KVs + BN * P, vg, a.v_s.st, jfirst, BN, doc.Lk - jfirst);
  }
  copy_commit();
  int stage = 0;
  for (int j0 = jfirst; j0 < ke; j0 += BN) {
    copy_wait_all();
    __syncthreads();  // block j0 is in smem; every warp is done with the stage the next copy overwrites
    uint16_t* Ks = KVs + stage * 2 * BN * P;
    uint16_t* Vs = Ks + BN * P;
    if (kStages > 1) {
      const int jn = j0 + BN;
      if (jn < ke) {
        uint16_t* Kn = KVs + (stage ^ 1) * 2 * BN * P;
        load_tile<D, kThreads>(Kn, kg, a.k_s.st, jn, BN, doc.Lk - jn);
        load_tile<D, kThreads>(Kn + BN * P, vg, a.v_s.st, jn, BN, doc.Lk - jn);
      }
      copy_commit();
      stage ^= 1;
    }

    float s[BN / 8][4];
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      uint32_t qa[4];
      frag_a(qa, Qs, P, warp * 16, kk);
#pragma unroll
      for (int t = 0; t < BN / 8; t += 2) {
        uint32_t b0[2], b1[2];
        frag_b_nk(b0, b1, Ks, P, t * 8, kk);
        mma16816<kBf16>(s[t], qa, b0);
        mma16816<kBf16>(s[t + 1], qa, b1);
      }
    }
    const bool full = mask.block_full(i0, i0 + BM, j0, j0 + BN);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = score_log2(s[t][e], a.scale, a.softcap, inv_cap, kSoftcap);
        if (!full) {
          const int i = i0 + r_lo + (e >= 2 ? 8 : 0), j = j0 + t * 8 + 2 * (lane & 3) + (e & 1);
          if (!mask.visible(i, j)) x = -INFINITY;
        }
        s[t][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 1));
      mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float corr = fast_exp2(m[r] - base);
      m[r] = m_new;
      mx[r] = base;  // reused: the exponent base of this block
      l[r] *= corr;
#pragma unroll
      for (int t = 0; t < D / 8; ++t) acc[t][2 * r] *= corr, acc[t][2 * r + 1] *= corr;
    }
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[t][e] = fast_exp2(s[t][e] - mx[e >> 1]);
        l[e >> 1] += s[t][e];
      }
    }
    // O += P V: P's accumulator layout is the A-fragment layout of the next product
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4] = {pack2<kBf16>(s[2 * kk][0], s[2 * kk][1]), pack2<kBf16>(s[2 * kk][2], s[2 * kk][3]),
                        pack2<kBf16>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                        pack2<kBf16>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int t = 0; t < D / 8; t += 2) {
        uint32_t b0[2], b1[2];
        frag_b_kn(b0, b1, Vs, P, kk * 16, t * 8);
        mma16816<kBf16>(acc[t], pa, b0);
        mma16816<kBf16>(acc[t + 1], pa, b1);
      }
    }
    if (kStages == 1) {
      const int jn = j0 + BN;
      __syncthreads();
      if (jn < ke) {
        load_tile<D, kThreads>(Ks, kg, a.k_s.st, jn, BN, doc.Lk - jn);
        load_tile<D, kThreads>(Vs, vg, a.v_s.st, jn, BN, doc.Lk - jn);
      }
      copy_commit();
    }
  }
  copy_wait_all();

  uint16_t* og = static_cast<uint16_t*>(a.out) + b * a.o_s.sb + doc.start_q * a.o_s.st + h * a.o_s.sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += shfl_xor(l[r], 1);
    l[r] += shfl_xor(l[r], 2);
    const int i = i0 + r_lo + 8 * r;
    if (i >= doc.Lq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    uint16_t* orow = og + (int64_t)i * a.o_s.st;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      *reinterpret_cast<uint32_t*>(orow + t * 8 + 2 * (lane & 3)) =
          pack2<kBf16>(acc[t][2 * r] * inv, acc[t][2 * r + 1] * inv);
    }
    if ((lane & 3) == 0) {
      a.lse[b * a.lse_sb + h * a.lse_sh + doc.start_q + i] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------- backward

// delta = rowsum(dO * O) per (token, q head), laid out as lse; dsinks[h] -= exp(sink_h - lse) * delta summed over
// the block's tokens (one atomic per block and head). Traffic: reads dO and O once, writes delta.
template <bool kBf16>
__global__ void __launch_bounds__(256) attn_bwd_preprocess_kernel(const AttnBwdArgs a) {
  constexpr int kRowsPerWarp = 8;
  const int h = blockIdx.y, warp = threadIdx.x / 32, lane = lane_id();
  __shared__ float part[8];
  float dsink = 0.f;
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t t = ((int64_t)blockIdx.x * 8 + warp) * kRowsPerWarp + rr;  // query token
    if (t >= a.Tq) break;
    int64_t b = 0, i = t;  // packed: token t of no batch; dense: (t / Sq, t % Sq)
    if (!a.cu_q) b = t / a.Sq, i = t % a.Sq;
    const uint16_t* o = static_cast<const uint16_t*>(a.out) + b * a.o_s.sb + i * a.o_s.st + h * a.o_s.sh;
    const uint16_t* d = static_cast<const uint16_t*>(a.dout) + b * a.do_s.sb + i * a.do_s.st + h * a.do_s.sh;
    float sum = 0.f;
    for (int x = 2 * lane; x < a.D; x += 64) {
      const uint32_t ov = *reinterpret_cast<const uint32_t*>(o + x), dv = *reinterpret_cast<const uint32_t*>(d + x);
      sum += to_f<kBf16>((uint16_t)(ov & 0xffffu)) * to_f<kBf16>((uint16_t)(dv & 0xffffu)) +
             to_f<kBf16>((uint16_t)(ov >> 16)) * to_f<kBf16>((uint16_t)(dv >> 16));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += shfl_xor(sum, off);
    const int64_t li = b * a.lse_sb + h * a.lse_sh + i;
    if (lane == 0) {
      a.delta[li] = sum;
      const float lse = a.lse[li];
      if (a.sinks && lse != -INFINITY) dsink -= expf(a.sinks[h] - lse) * sum;
    }
  }
  if (!a.dsinks) return;
  if (lane == 0) part[warp] = dsink;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < 8; ++w) total += part[w];
    if (total != 0.f) atomicAdd(a.dsinks + h, total);
  }
}

// dK, dV of one (key block, kv head, document), and its share of dQ (fp32 atomics). Traffic: reads the K / V block
// once and, per q head of the group, every Q / dO block (with lse, delta) that sees it; writes dK / dV once.
template <bool kBf16, int D, int kWarps, int BM, bool kSoftcap>
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_kernel(const AttnBwdArgs a) {
  constexpr int BN = kWarps * 16, kThreads = kWarps * 32, P = D + kPad, PS = BN + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* Ks = smem;             // [BN][P]
  uint16_t* Vs = Ks + BN * P;      // [BN][P]
  uint16_t* Qs = Vs + BN * P;      // [BM][P]
  uint16_t* dOs = Qs + BM * P;     // [BM][P]
  uint16_t* dSs = dOs + BM * P;    // [BM][PS]  dS as [query][key]
  float* lse_s = reinterpret_cast<float*>(dSs + BM * PS);  // [BM], log2 units; +inf: the row contributes nothing
  float* delta_s = lse_s + BM;                              // [BM]

  const int b = blockIdx.z, hk = blockIdx.y, group = a.Hq / a.Hkv;
  const Doc doc = doc_of(a, b);
  const int j0 = blockIdx.x * BN;
  if (j0 >= doc.Lk) return;
  const AttnMask mask{(int64_t)doc.Lk - doc.Lq, doc.Lk, a.window, a.causal};
  const int j1 = min(j0 + BN, doc.Lk);
  const int qb = (int)mask.query_begin(j0), qe = (int)mask.query_end(j1, doc.Lq);

  const uint16_t* kg = static_cast<const uint16_t*>(a.k) + b * a.k_s.sb + doc.start_k * a.k_s.st + hk * a.k_s.sh;
  const uint16_t* vg = static_cast<const uint16_t*>(a.v) + b * a.v_s.sb + doc.start_k * a.v_s.st + hk * a.v_s.sh;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int c_lo = warp * 16 + lane / 4;  // this thread's keys in the block: c_lo, c_lo + 8
  const float inv_cap = kSoftcap ? 1.f / a.softcap : 0.f;
  const int64_t dq_tok0 = a.cu_q ? doc.start_q : (int64_t)b * a.Sq;

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int t = 0; t < D / 8; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;

  load_tile<D, kThreads>(Ks, kg, a.k_s.st, j0, BN, doc.Lk - j0);
  load_tile<D, kThreads>(Vs, vg, a.v_s.st, j0, BN, doc.Lk - j0);

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const uint16_t* qg = static_cast<const uint16_t*>(a.q) + b * a.q_s.sb + doc.start_q * a.q_s.st + h * a.q_s.sh;
    const uint16_t* dog =
        static_cast<const uint16_t*>(a.dout) + b * a.do_s.sb + doc.start_q * a.do_s.st + h * a.do_s.sh;
    const float* lse_g = a.lse + b * a.lse_sb + h * a.lse_sh + doc.start_q;
    const float* delta_g = a.delta + b * a.lse_sb + h * a.lse_sh + doc.start_q;
    float* dqg = a.dq_accum + (dq_tok0 * a.Hq + h) * D;
    for (int i0 = (qb / BM) * BM; i0 < qe; i0 += BM) {
      load_tile<D, kThreads>(Qs, qg, a.q_s.st, i0, BM, doc.Lq - i0);
      load_tile<D, kThreads>(dOs, dog, a.do_s.st, i0, BM, doc.Lq - i0);
      for (int r = threadIdx.x; r < BM; r += kThreads) {
        const float l = i0 + r < doc.Lq ? lse_g[i0 + r] : -INFINITY;
        lse_s[r] = l == -INFINITY ? INFINITY : l * kLog2e;
        delta_s[r] = i0 + r < doc.Lq ? delta_g[i0 + r] : 0.f;
      }
      copy_commit_wait();
      __syncthreads();

      // S^T = K Q^T for this warp's 16 keys x BM queries
      float st[BM / 8][4];
#pragma unroll
      for (int t = 0; t < BM / 8; ++t) st[t][0] = st[t][1] = st[t][2] = st[t][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D; kk += 16) {
        uint32_t ka[4];
        frag_a(ka, Ks, P, warp * 16, kk);
#pragma unroll
        for (int t = 0; t < BM / 8; t += 2) {
          uint32_t b0[2], b1[2];
          frag_b_nk(b0, b1, Qs, P, t * 8, kk);
          mma16816<kBf16>(st[t], ka, b0);
          mma16816<kBf16>(st[t + 1], ka, b1);
        }
      }
      // dP^T = V dO^T
      float dpt[BM / 8][4];
#pragma unroll
      for (int t = 0; t < BM / 8; ++t) dpt[t][0] = dpt[t][1] = dpt[t][2] = dpt[t][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D; kk += 16) {
        uint32_t va[4];
        frag_a(va, Vs, P, warp * 16, kk);
#pragma unroll
        for (int t = 0; t < BM / 8; t += 2) {
          uint32_t b0[2], b1[2];
          frag_b_nk(b0, b1, dOs, P, t * 8, kk);
          mma16816<kBf16>(dpt[t], va, b0);
          mma16816<kBf16>(dpt[t + 1], va, b1);
        }
      }
      // P^T and dS^T (in place of st and dpt); dS scaled to d loss / d (q.k)
      const bool full = mask.block_full(i0, i0 + BM, j0, j0 + BN);
#pragma unroll
      for (int t = 0; t < BM / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = t * 8 + 2 * (lane & 3) + (e & 1);  // query in the block
          const int kj = c_lo + (e >= 2 ? 8 : 0);            // key in the block
          const float x = score_log2(st[t][e], a.scale, a.softcap, inv_cap, kSoftcap);
          float p = fast_exp2(x - lse_s[qi]);
          if (!full && !mask.visible(i0 + qi, j0 + kj)) p = 0.f;
          float g = a.scale;
          if (kSoftcap) g *= attn_softcap_grad(x * kLn2, inv_cap);
          st[t][e] = p;
          dpt[t][e] = p * (dpt[t][e] - delta_s[qi]) * g;
        }
      }
      // dV += P^T dO, dK += dS^T Q (A operands from registers; B from smem rows = queries)
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        uint32_t pa[4] = {pack2<kBf16>(st[2 * kk][0], st[2 * kk][1]), pack2<kBf16>(st[2 * kk][2], st[2 * kk][3]),
                          pack2<kBf16>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                          pack2<kBf16>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
        uint32_t da[4] = {pack2<kBf16>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<kBf16>(dpt[2 * kk][2], dpt[2 * kk][3]),
                          pack2<kBf16>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                          pack2<kBf16>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
        for (int t = 0; t < D / 8; t += 2) {
          uint32_t b0[2], b1[2];
          frag_b_kn(b0, b1, dOs, P, kk * 16, t * 8);
          mma16816<kBf16>(dv[t], pa, b0);
          mma16816<kBf16>(dv[t + 1], pa, b1);
          frag_b_kn(b0, b1, Qs, P, kk * 16, t * 8);
          mma16816<kBf16>(dk[t], da, b0);
          mma16816<kBf16>(dk[t + 1], da, b1);
        }
        // dS^T -> smem as dS[query][key] for the dQ product
#pragma unroll
        for (int u = 0; u < 2; ++u) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qi = (2 * kk + u) * 8 + 2 * (lane & 3) + (e & 1);
            const int kj = c_lo + (e >= 2 ? 8 : 0);
            const uint32_t pk = pack2<kBf16>(dpt[2 * kk + u][e], 0.f);
            dSs[qi * PS + kj] = (uint16_t)(pk & 0xffffu);
          }
        }
      }
      __syncthreads();
      // dQ[BM x D] += dS[BM x BN] K[BN x D]: 16 x 16 output units spread over the warps
      for (int unit = warp; unit < (BM / 16) * (D / 16); unit += kWarps) {
        const int r0 = (unit / (D / 16)) * 16, n0 = (unit % (D / 16)) * 16;
        float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < BN; kk += 16) {
          uint32_t sa[4], b0[2], b1[2];
          frag_a(sa, dSs, PS, r0, kk);
          frag_b_kn(b0, b1, Ks, P, kk, n0);
          mma16816<kBf16>(c0, sa, b0);
          mma16816<kBf16>(c1, sa, b1);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int qi = r0 + lane / 4 + 8 * r;
          if (i0 + qi >= doc.Lq) continue;
          float* row = dqg + (int64_t)(i0 + qi) * a.Hq * D + n0 + 2 * (lane & 3);
          add2(row, c0[2 * r], c0[2 * r + 1]);
          add2(row + 8, c1[2 * r], c1[2 * r + 1]);
        }
      }
      __syncthreads();
    }
  }

  copy_commit_wait();  // the K / V copies, when no query block sees this key block
  uint16_t* dkg = static_cast<uint16_t*>(a.dk) + b * a.dk_s.sb + doc.start_k * a.dk_s.st + hk * a.dk_s.sh;
  uint16_t* dvg = static_cast<uint16_t*>(a.dv) + b * a.dv_s.sb + doc.start_k * a.dv_s.st + hk * a.dv_s.sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j0 + c_lo + 8 * r;
    if (j >= doc.Lk) continue;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      const int col = t * 8 + 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(dkg + (int64_t)j * a.dk_s.st + col) = pack2<kBf16>(dk[t][2 * r], dk[t][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dvg + (int64_t)j * a.dv_s.st + col) = pack2<kBf16>(dv[t][2 * r], dv[t][2 * r + 1]);
    }
  }
}

// ---------------------------------------------------------------- launch

template <bool kBf16, int D, bool kSoftcap>
cudaError_t forward_d(const AttnFwdArgs& a, cudaStream_t stream) {
  // D 256: one K / V stage (two would need 169 KB of smem, over sm_80's 164 KB)
  constexpr int kWarps = D >= 256 ? 4 : 8, BN = 64, BM = kWarps * 16, kStages = D >= 256 ? 1 : 2;
  const size_t smem = (size_t)(BM + 2 * kStages * BN) * (D + kPad) * 2;
  dim3 grid((a.Sq + BM - 1) / BM, a.Hq, a.B);
  if (grid.x == 0) return cudaSuccess;
  auto kernel = attn_fwd_kernel<kBf16, D, kWarps, BN, kStages, kSoftcap>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kWarps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

template <bool kBf16, int D, int kWarps, bool kSoftcap>
cudaError_t backward_w(const AttnBwdArgs& a, cudaStream_t stream) {
  constexpr int BN = kWarps * 16, BM = D >= 128 ? 32 : 64;
  const size_t smem = (size_t)(2 * BN + 2 * BM) * (D + kPad) * 2 + (size_t)BM * (BN + kPad) * 2 + 2 * BM * 4;
  dim3 grid((a.Sk + BN - 1) / BN, a.Hkv, a.B);
  if (grid.x == 0) return cudaSuccess;
  auto kernel = attn_bwd_kernel<kBf16, D, kWarps, BM, kSoftcap>;
  if (smem > 48 * 1024) {
    cudaError_t e =
        cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kWarps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

// 4 warps (64 keys per CTA): 8 warps (128 keys, half the dQ atomics) measured no faster on an H100 (see
// benchmarks/NOTES.md, 2026-12-08).
template <bool kBf16, int D, bool kSoftcap>
cudaError_t backward_d(const AttnBwdArgs& a, cudaStream_t stream) {
  return backward_w<kBf16, D, 4, kSoftcap>(a, stream);
}

template <bool kBf16, bool kSoftcap>
cudaError_t forward_t(const AttnFwdArgs& a, cudaStream_t stream) {
  switch (a.D) {
    case 64: return forward_d<kBf16, 64, kSoftcap>(a, stream);
    case 128: return forward_d<kBf16, 128, kSoftcap>(a, stream);
    case 256: return forward_d<kBf16, 256, kSoftcap>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <bool kBf16, bool kSoftcap>
cudaError_t backward_t(const AttnBwdArgs& a, cudaStream_t stream) {
  switch (a.D) {
    case 64: return backward_d<kBf16, 64, kSoftcap>(a, stream);
    case 128: return backward_d<kBf16, 128, kSoftcap>(a, stream);
    case 256: return backward_d<kBf16, 256, kSoftcap>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_forward(const AttnFwdArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.Sq == 0 || a.Hq == 0) return cudaSuccess;
  const bool cap = a.softcap > 0.f;
  if (a.bf16) return cap ? forward_t<true, true>(a, stream) : forward_t<true, false>(a, stream);
  return cap ? forward_t<false, true>(a, stream) : forward_t<false, false>(a, stream);
}

cudaError_t attention_backward(const AttnBwdArgs& a, cudaStream_t stream) {
  if (a.Tq == 0 || a.Hq == 0) return cudaSuccess;
  dim3 pgrid((unsigned)((a.Tq + 63) / 64), a.Hq);
  if (a.bf16) {
    attn_bwd_preprocess_kernel<true><<<pgrid, 256, 0, stream>>>(a);
  } else {
    attn_bwd_preprocess_kernel<false><<<pgrid, 256, 0, stream>>>(a);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || a.Sk == 0 || a.B == 0) return e;
  const bool cap = a.softcap > 0.f;
  if (a.bf16) return cap ? backward_t<true, true>(a, stream) : backward_t<true, false>(a, stream);
  return cap ? backward_t<false, true>(a, stream) : backward_t<false, false>(a, stream);
}

}  // namespace sloth::cuda
