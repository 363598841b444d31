// MoE kernels: routing, counting-sort permute, grouped GEMM over dense / NF4 / MXFP4 expert stacks, GLU
// backward, combine and its backward. Semantics: python/sloth/reference/moe.py.
//
// Grouped GEMM, tensor-core path (NVIDIA sm_80+, bf16 / fp16 activations): one CTA of 8 warps computes a
// 128 x 128 tile of one expert (rows of the expert's offset range x output columns), taken from a tile schedule
// built on the device from the offsets (tile_start[e] = sum of ceil(count / 128) over earlier experts; no host
// synchronization), K in steps of 32 through a two-stage shared-memory pipeline. A rows are gathered by index
// (the permute is fused into the prologue) with cp.async; 16-bit B tiles arrive by cp.async, 4-bit B tiles
// (NF4 / MXFP4) are loaded into registers one stage ahead and decoded to bf16 / fp16 into shared memory while
// the tensor cores work on the current stage: no dequantized [E, out, in] stack exists. mma.sync m16n8k16 with
// fp32 accumulators (each warp 64 x 32). Epilogue: bias, LoRA (scaling * lora_t lora_B^T, rank-r per element),
// the pre-activation store, and the GLU (for [gate; up] concatenated layouts the tile's columns are remapped so
// that every thread holds matching gate and up accumulators).
// SIMT path (small batches: decode, rollouts; odd shapes; fp32; HIP): a CTA per (expert, 64 output units);
// experts without rows exit at once, so only experts with tokens read their weights, once per 4 rows.
#include <stdint.h>

#include "moe.h"
#include "sloth/moe.h"
#include "sloth/numeric.h"
#include "sloth/portability.h"

namespace sloth::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kThreads = 256;
constexpr int kPadA = kBK + 8;   // smem row of A / k-contiguous B: 40 halves (80 B, ldmatrix conflict-free)
constexpr int kPadBN = kBN + 8;  // smem row of n-contiguous B: 136 halves

__device__ __forceinline__ float warp_sum32(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += shfl_xor(v, o);
  return v;
}

// ------------------------------------------------------------------ routing

// One 32-lane group per token; each lane holds E / 32 scores. k rounds of a group argmax (ties: lower index).
__global__ void moe_route_kernel(const float* __restrict__ logits, int64_t T, int E, int k, int kind, bool renorm,
                                 float* __restrict__ weights, int64_t* __restrict__ ids) {
  constexpr int kMaxPer = 32;  // E <= 1024
  const int lane = threadIdx.x & 31;
  const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* z = logits + t * E;
  float v[kMaxPer];
  const int per = (E + 31) / 32;
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i)
    if (i < per) {
      const int e = i * 32 + lane;
      v[i] = e < E ? z[e] : -INFINITY;
      m = fmaxf(m, v[i]);
    }
#pragma unroll
  for (int o = 16; o; o >>= 1) m = fmaxf(m, shfl_xor(m, o));
  if (kind == 0) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i)
      if (i < per) {
        const int e = i * 32 + lane;
        v[i] = e < E ? expf(v[i] - m) : -INFINITY;
        s += e < E ? v[i] : 0.0f;
      }
    s = warp_sum32(s);
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i)
      if (i < per && i * 32 + lane < E) v[i] /= s;
  }
  float sel_sum = 0.0f, top = 0.0f;
  for (int j = 0; j < k; ++j) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i)
      if (i < per) {
        const int e = i * 32 + lane;
        if (e < E && (v[i] > bv || (v[i] == bv && e < bi))) { bv = v[i]; bi = e; }
      }
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      const float ov = shfl_xor(bv, o);
      const int oi = shfl_xor(bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (j == 0) top = bv;
    float w = bv;
    if (kind == 1) w = expf(bv - top);
    sel_sum += w;
    if (lane == 0) {
      weights[t * k + j] = w;
      ids[t * k + j] = bi;
    }
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i)  // remove the chosen expert
      if (i < per && i * 32 + lane == bi) v[i] = -INFINITY;
  }
  if ((kind == 1 || renorm) && lane == 0)
    for (int j = 0; j < k; ++j) weights[t * k + j] /= sel_sum;
}

// ------------------------------------------------------------------ permute (stable counting sort)

constexpr int kChunk = 512;  // slots per CTA of the counting passes

template <typename Id>
__device__ __forceinline__ int expert_of(const Id* ids, int64_t i, int E) {
  const int64_t e = (int64_t)ids[i];
  return (e >= 0 && e < E) ? (int)e : E;  // E: the tail bin of out-of-range ids
}

// counts[c][e]: slots of chunk c routed to e (E + 1 bins).
template <typename Id>
__global__ void moe_count_kernel(const Id* __restrict__ ids, int64_t R, int E, int32_t* __restrict__ counts) {
  extern __shared__ int32_t s_cnt[];
  for (int e = threadIdx.x; e <= E; e += blockDim.x) s_cnt[e] = 0;
  __syncthreads();
  const int64_t i = (int64_t)blockIdx.x * kChunk + threadIdx.x;
  if (i < R) atomicAdd(&s_cnt[expert_of(ids, i, E)], 1);
  __syncthreads();
  for (int e = threadIdx.x; e <= E; e += blockDim.x) counts[(int64_t)blockIdx.x * (E + 1) + e] = s_cnt[e];
}

// One CTA: per bin an exclusive scan over chunks (in place: counts[c][e] becomes the bin-relative base of chunk
// c), then the bins' offsets, added to every chunk base.
__global__ void moe_scan_kernel(int32_t* __restrict__ counts, int64_t chunks, int E, int32_t* __restrict__ offsets) {
  __shared__ int32_t s_tot[1025];
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    int32_t run = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = counts[c * (E + 1) + e];
      counts[c * (E + 1) + e] = run;
      run += n;
    }
    s_tot[e] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0;
    for (int e = 0; e <= E; ++e) {
      const int32_t n = s_tot[e];
      s_tot[e] = run;
      if (e <= E) offsets[e] = run;  // offsets[E] = number of in-range slots
      run += n;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    const int32_t base = s_tot[e];
    for (int64_t c = 0; c < chunks; ++c) counts[c * (E + 1) + e] += base;
  }
}

// Stable placement: rank within the chunk = earlier slots of the same bin, counted through shared memory in
// groups of 32 (group totals per bin, then the slot's own group).
template <typename Id>
__global__ void moe_place_kernel(const Id* __restrict__ ids, int64_t R, int E, const int32_t* __restrict__ base,
                                 int32_t* __restrict__ sorted_slots, int32_t* __restrict__ slot_pos) {
  __shared__ int32_t s_e[kChunk];
  extern __shared__ int32_t s_grp[];  // [kChunk / 32][E + 1]
  const int tid = threadIdx.x, grp = tid >> 5, ngrp = kChunk / 32;
  const int64_t i = (int64_t)blockIdx.x * kChunk + tid;
  const int e = i < R ? expert_of(ids, i, E) : -1;
  s_e[tid] = e;
  for (int j = tid; j < ngrp * (E + 1); j += blockDim.x) s_grp[j] = 0;
  __syncthreads();
  int before = 0, first = 1;
  for (int j = grp * 32; j < tid; ++j)
    if (s_e[j] == e) { ++before; first = 0; }
  if (e >= 0 && first) {  // the group's first slot of bin e counts the group's slots of e
    int n = 0;
    for (int j = tid; j < grp * 32 + 32; ++j) n += s_e[j] == e;
    s_grp[grp * (E + 1) + e] = n;
  }
  __syncthreads();
  if (e < 0) return;
  for (int g = 0; g < grp; ++g) before += s_grp[g * (E + 1) + e];
  const int32_t r = base[(int64_t)blockIdx.x * (E + 1) + e] + before;
  sorted_slots[r] = (int32_t)i;
  slot_pos[i] = e < E ? r : -1;  // a dropped slot (id out of range): the combine skips it
}

// ------------------------------------------------------------------ grouped GEMM: shared pieces

// tile_start[e] = sum over e' < e of ceil(count(e') / kBM), tile_start[E] = all tiles (one CTA of 32 threads).
__global__ void moe_tile_schedule_kernel(const int32_t* __restrict__ offsets, int E, int32_t* __restrict__ tile_start) {
  __shared__ int32_t s_part[32];
  const int t = threadIdx.x, per = (E + 31) / 32;
  int32_t sum = 0;
  for (int e = t * per; e < min(E, (t + 1) * per); ++e) sum += (offsets[e + 1] - offsets[e] + kBM - 1) / kBM;
  s_part[t] = sum;
  __syncthreads();
  if (t == 0) {
    int32_t run = 0;
    for (int i = 0; i < 32; ++i) {
      const int32_t n = s_part[i];
      s_part[i] = run;
      run += n;
    }
    tile_start[E] = run;
  }
  __syncthreads();
  int32_t run = s_part[t];
  for (int e = t * per; e < min(E, (t + 1) * per); ++e) {
    tile_start[e] = run;
    run += (offsets[e + 1] - offsets[e] + kBM - 1) / kBM;
  }
}

// Logical column of tile column c (0..127) of N-tile nt: identity, or for a concatenated GLU the remap that puts
// gate j and up j into the same thread (per 32 columns: 16 gate, then the 16 matching up).
__device__ __forceinline__ int64_t tile_col(int64_t nt, int c, bool concat_glu, int64_t Nout) {
  if (!concat_glu) return nt * kBN + c;
  const int64_t j = nt * (kBN / 2) + (c >> 5) * 16 + (c & 15);
  return (c & 16) ? Nout + j : j;
}

// 8 4-bit codes of one 32-bit word -> 8 values of T (bits) in element order, times scale.
template <bool kNf4, OutType T>
__device__ __forceinline__ void decode8(uint32_t word, float scale, uint8_t mx_s, uint32_t out[4]) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t byte = (word >> (8 * b)) & 255u;
    float v0, v1;
    if constexpr (kNf4) {  // element 2j in the high nibble
      v0 = mul_rn(nf4_value(byte >> 4), scale);
      v1 = mul_rn(nf4_value(byte & 15u), scale);
    } else {  // MXFP4: element 2j in the low nibble
      v0 = mx_scale_value(e2m1_value(byte & 15u), scale, mx_s);
      v1 = mx_scale_value(e2m1_value(byte >> 4), scale, mx_s);
    }
    out[b] = (uint32_t)from_float<T>(v0) | ((uint32_t)from_float<T>(v1) << 16);
  }
}

// Scale of the 8-element group starting at flat element g of expert e.
template <bool kNf4>
__device__ __forceinline__ float group_scale(const MoeWeight& w, int64_t g, int64_t e, uint8_t* mx_s) {
  if constexpr (kNf4) {
    *mx_s = 0;
    return moe_nf4_absmax(w, g / w.blocksize, e);
  } else {
    const uint8_t s = w.scales[g >> 5];
    *mx_s = s;
    return e8m0_to_float(s);
  }
}

// Epilogue value of logical column n of row r (expert e): acc + bias + LoRA.
template <OutType T>
__device__ __forceinline__ float epi_add(const MoeGemmArgs& a, float acc, int64_t r, int64_t e, int64_t n) {
  using raw = typename OutStorage<T>::type;
  if (a.bias) acc += a.bias[e * a.N + n];
  if (a.lora_t) {
    const raw* t = static_cast<const raw*>(a.lora_t) + r * a.rank;
    const raw* b = static_cast<const raw*>(a.lora_B) + (e * a.N + n) * a.rank;
    float s = 0.0f;
    for (int q = 0; q < a.rank; ++q) s += to_float<T>(t[q]) * to_float<T>(b[q]);
    acc += a.scaling * s;
  }
  return acc;
}

// ------------------------------------------------------------------ grouped GEMM: tensor-core path

#if !defined(SLOTH_HIP)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <OutType T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (T == OutType::kBF16) {
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
}

// B tile source kinds: dense k-contiguous / n-contiguous (cp.async), 4-bit k-contiguous / n-contiguous (decoded).
enum BKind : int { kDenseK = 0, kDenseN = 1, kQuantK = 2, kQuantN = 3 };

// One 128 x 128 tile of one expert: out[r, :] = epilogue(x[rows[r]] W_e^T) for the tile's rows and columns.
// Traffic per tile: 128 gathered rows of x and the expert's 128 x K weight slice (4-bit: K / 2 bytes per row plus
// scales), each read once; outputs written once.
constexpr int kBStage = kBN * kPadA > kBK * kPadBN ? kBN * kPadA : kBK * kPadBN;  // halves per B stage
constexpr size_t tc_smem_bytes(int stages) { return (size_t)stages * (kBM * kPadA + kBStage) * 2; }

template <OutType T, int KIND, bool kNf4, int STAGES>
__global__ void __launch_bounds__(kThreads) moe_gemm_tc_kernel(MoeGemmArgs a) {
  using raw = uint16_t;
  extern __shared__ __align__(16) unsigned char moe_tc_smem[];  // STAGES x A [kBM][kPadA], then STAGES x B
  raw (*sA)[kBM][kPadA] = reinterpret_cast<raw (*)[kBM][kPadA]>(moe_tc_smem);
  raw (*sB)[kBStage] = reinterpret_cast<raw (*)[kBStage]>(moe_tc_smem + (size_t)STAGES * kBM * kPadA * sizeof(raw));

  const int E = (int)a.w.E;
  const int tile = blockIdx.y;
  if (tile >= a.tile_start[E]) return;
  int lo = 0, hi = E - 1;  // the expert e with tile_start[e] <= tile < tile_start[e + 1]
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a.tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  const int64_t e = lo;
  const int64_t row_end = a.offsets[e + 1];
  const int64_t m0 = a.offsets[e] + (int64_t)(tile - a.tile_start[e]) * kBM;
  const int64_t nt = blockIdx.x;
  const bool concat_glu = a.glu && !moe_glu_interleaved(a.glu);
  const int64_t Nout = a.glu ? a.N / 2 : a.N;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;

  // A: 2 chunks of 16 B per thread and stage: row = c / 4, k = (c % 4) * 8; the gathered source rows are fixed.
  const raw* a_src[2];
  bool a_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = tid + i * kThreads;
    const int64_t r = m0 + (c >> 2);
    a_ok[i] = r < row_end;
    int64_t src = a_ok[i] ? (a.rows ? (int64_t)a.rows[r] : r) : 0;
    if (src < 0 || src >= a.x_rows) a_ok[i] = false, src = 0;  // a bad gather index reads zeros, never out of bounds
    a_src[i] = static_cast<const raw*>(a.x) + src * a.K + (c & 3) * 8;
  }
  // B: 2 chunks of 8 elements per thread and stage. k-contiguous: n = c / 4, k = (c % 4) * 8;
  // n-contiguous: k = c / 16, n = (c % 16) * 8.
  const MoeWeight& w = a.w;
  const int64_t s_n = a.trans ? w.s_b : w.s_a, s_k = a.trans ? w.s_a : w.s_b;
  int64_t b_n[2];
  int b_row[2], b_col[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = tid + i * kThreads;
    if (KIND == kDenseK || KIND == kQuantK) {
      b_row[i] = c >> 2;  // n within the tile
      b_col[i] = (c & 3) * 8;
      b_n[i] = tile_col(nt, b_row[i], concat_glu, Nout);
    } else {
      b_row[i] = c >> 4;  // k within the stage
      b_col[i] = (c & 15) * 8;
      b_n[i] = tile_col(nt, b_col[i], concat_glu, Nout);  // 8 columns stay contiguous under the remap
    }
  }
  // 4-bit stage in registers: the packed word and the independent parts of its scale (the dependent lookup
  // code2[absmax_q] waits until after the MMAs, from shared memory).
  uint32_t q_word[2];
  float q_f[2], q_off[2];  // fp32 absmax or absmax2; double-quantization offset
  uint8_t q_u8[2];         // absmax_q (NF4, double quantized) or the E8M0 scale (MXFP4)
  __shared__ float s_code2[256];
  const bool dq = kNf4 && w.absmax_q != nullptr;
  if (KIND >= kQuantK && dq) {
    s_code2[tid] = w.code2[tid];  // kThreads == 256
    __syncthreads();
  }

  auto issue = [&](int stage, int64_t k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads;
      const bool ok = a_ok[i] && k0 + (c & 3) * 8 < a.K;
      cp_async16(&sA[stage][c >> 2][(c & 3) * 8], ok ? (const void*)(a_src[i] + k0) : a.x, ok);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t n = b_n[i];
      if (KIND == kDenseK) {
        const int64_t k = k0 + b_col[i];
        const bool ok = n < a.N && k < a.K;
        const raw* src = static_cast<const raw*>(w.data) + e * w.s_e + n * s_n + k;
        cp_async16(&sB[stage][b_row[i] * kPadA + b_col[i]], ok ? (const void*)src : w.data, ok);
      } else if (KIND == kDenseN) {
        const int64_t k = k0 + b_row[i];
        const bool ok = n < a.N && k < a.K;
        const raw* src = static_cast<const raw*>(w.data) + e * w.s_e + k * s_k + n;
        cp_async16(&sB[stage][b_row[i] * kPadBN + b_col[i]], ok ? (const void*)src : w.data, ok);
      } else {
        // 4-bit: flat element g of (storage a, b): k-contiguous (a = n, b = k) or n-contiguous (a = k, b = n)
        const int64_t k = k0 + (KIND == kQuantK ? b_col[i] : b_row[i]);
        const bool ok = n < a.N && k < a.K;
        q_word[i] = 0;
        q_f[i] = 0.0f;
        q_off[i] = 0.0f;
        q_u8[i] = 0;
        if (ok) {
          const int64_t g = KIND == kQuantK ? (e * w.A + n) * w.B + k : (e * w.A + k) * w.B + n;
          q_word[i] = *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(w.data) + (g >> 1));
          if constexpr (kNf4) {
            const int64_t blk = g / w.blocksize;
            if (dq) {
              q_u8[i] = w.absmax_q[blk];
              if (w.offset_per_expert) {
                q_f[i] = w.absmax2[e * w.nb2_e + ((blk - e * w.nb_e) >> w.log2_blocksize2)];
                q_off[i] = w.offset[e];
              } else {
                q_f[i] = w.absmax2[blk >> w.log2_blocksize2];
                q_off[i] = w.offset[0];
              }
            } else {
              q_f[i] = w.absmax[blk];
            }
          } else {
            q_u8[i] = w.scales[g >> 5];
          }
        }
      }
    }
    cp_async_commit();
  };
  auto store_quant = [&](int stage) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint32_t v[4];
      if constexpr (kNf4) {
        const float scale = dq ? s_code2[q_u8[i]] * q_f[i] + q_off[i] : q_f[i];
        decode8<true, T>(q_word[i], scale, 0, v);
      } else {
        decode8<false, T>(q_word[i], e8m0_to_float(q_u8[i]), q_u8[i], v);
      }
      raw* dst = KIND == kQuantK ? &sB[stage][b_row[i] * kPadA + b_col[i]] : &sB[stage][b_row[i] * kPadBN + b_col[i]];
      *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // STAGES-deep pipeline: tile kt + STAGES - 1 is requested while tile kt is multiplied (4-bit B tiles: loaded
  // into registers there and decoded into their stage after the MMAs).
  const int64_t nk = (a.K + kBK - 1) / kBK;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < nk) {
      issue(st, (int64_t)st * kBK);
      if (KIND >= kQuantK) store_quant(st);
    } else {
      cp_async_commit();  // empty group: the wait counts stay uniform
    }
  }
  for (int64_t kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int cur = (int)(kt % STAGES);
    const int64_t nxt = kt + STAGES - 1;
    const int nst = (int)(nxt % STAGES);  // the stage multiplied in iteration kt - 1: free after the barrier
    if (nxt < nk) issue(nst, nxt * kBK); else cp_async_commit();
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldsm_x4(af[mi], &sA[cur][warp_m * 64 + mi * 16 + (lane & 15)][ks + (lane >> 4) * 8]);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {  // two n8 tiles per ldmatrix.x4
        const int mtx = lane >> 3, rr = lane & 7;
        uint32_t r4[4];
        const int nb = warp_n * 32 + nj * 16 + (mtx >> 1) * 8;
        if (KIND == kDenseK || KIND == kQuantK) {
          ldsm_x4(r4, &sB[cur][(nb + rr) * kPadA + ks + (mtx & 1) * 8]);
        } else {
          ldsm_x4_t(r4, &sB[cur][(ks + (mtx & 1) * 8 + rr) * kPadBN + nb]);
        }
        bf[nj * 2][0] = r4[0];
        bf[nj * 2][1] = r4[1];
        bf[nj * 2 + 1][0] = r4[2];
        bf[nj * 2 + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
    if (KIND >= kQuantK && nxt < nk) store_quant(nst);
  }
  cp_async_wait_all();
  __syncthreads();

  // ---- LoRA: one more tensor-core step on the accumulators, acc += (scaling * lora_t) lora_B^T over k < rank.
  // The tile's lora_t rows (scaled, rounded to T) and lora_B columns go into the (now free) stage-0 buffers in
  // the k-contiguous layout, zero past the rank; 16 MMAs per warp and 16-wide k step.
  constexpr int kMaxRank = kBK;
  const bool lora_mma = a.lora_t != nullptr && a.rank <= kMaxRank;
  if (lora_mma) {
    const raw* lt = static_cast<const raw*>(a.lora_t);
    const raw* lb = static_cast<const raw*>(a.lora_B);
    raw* sLb = &sB[0][0];  // [kBN][kPadA]
    for (int i = tid; i < kBM * kBK; i += kThreads) {
      const int rr = i / kBK, q = i % kBK;
      const int64_t r = m0 + rr;
      const int64_t n = tile_col(nt, rr, concat_glu, Nout);
      const bool okq = q < a.rank;
      sA[0][rr][q] = (okq && r < row_end) ? from_float<T>(a.scaling * to_float<T>(lt[r * a.rank + q])) : (raw)0;
      sLb[rr * kPadA + q] = (okq && n < a.N) ? lb[(e * a.N + n) * a.rank + q] : (raw)0;
    }
    __syncthreads();
    for (int ks = 0; ks < a.rank; ks += 16) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldsm_x4(af[mi], &sA[0][warp_m * 64 + mi * 16 + (lane & 15)][ks + (lane >> 4) * 8]);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int mtx = lane >> 3, rr = lane & 7;
        uint32_t r4[4];
        const int nb = warp_n * 32 + nj * 16 + (mtx >> 1) * 8;
        ldsm_x4(r4, &sLb[(nb + rr) * kPadA + ks + (mtx & 1) * 8]);
        bf[nj * 2][0] = r4[0];
        bf[nj * 2][1] = r4[1];
        bf[nj * 2 + 1][0] = r4[2];
        bf[nj * 2 + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  // ---- epilogue: bias, pre-activation, GLU
  using st = typename OutStorage<T>::type;
  st* out = static_cast<st*>(a.out);
  st* pre = static_cast<st*>(a.pre);
  auto store2 = [](st* p, float v0, float v1) {  // two adjacent outputs, one 32-bit store (p is 4-byte aligned)
    *reinterpret_cast<uint32_t*>(p) = (uint32_t)from_float<T>(v0) | ((uint32_t)from_float<T>(v1) << 16);
  };
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t r = m0 + warp_m * 64 + mi * 16 + (lane >> 2) + half * 8;
      if (r >= row_end) continue;
      float v[4][2];
      int64_t ncol[4];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int c = warp_n * 32 + ni * 8 + (lane & 3) * 2;
        ncol[ni] = tile_col(nt, c, concat_glu, Nout);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float x = acc[mi][ni][half * 2 + q];
          const int64_t n = ncol[ni] + q;
          if (n < a.N) {
            if (a.bias) x += a.bias[e * a.N + n];
            if (a.lora_t && !lora_mma) {  // rank > kMaxRank: straight from global memory
              const raw* lt = static_cast<const raw*>(a.lora_t) + r * a.rank;
              const raw* lb = static_cast<const raw*>(a.lora_B) + (e * a.N + n) * a.rank;
              float sum = 0.0f;
              for (int qq = 0; qq < a.rank; ++qq) sum += to_float<T>(lt[qq]) * to_float<T>(lb[qq]);
              x += a.scaling * sum;
            }
          }
          v[ni][q] = x;
        }
        if (pre && ncol[ni] < a.N) store2(pre + r * a.N + ncol[ni], v[ni][0], v[ni][1]);
      }
      if (!a.glu) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          if (ncol[ni] < a.N) store2(out + r * a.N + ncol[ni], v[ni][0], v[ni][1]);
      } else if (!concat_glu) {  // interleaved: (gate, up) = (even, odd) column of one pair
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          if (ncol[ni] < a.N)
            out[r * Nout + ncol[ni] / 2] = from_float<T>(moe_glu_fwd(a.glu, v[ni][0], v[ni][1], a.alpha, a.limit));
      } else {  // concatenated: gate in n8 tiles 0, 1 and the matching up in 2, 3
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
          if (ncol[ni] < Nout)
            store2(out + r * Nout + ncol[ni], moe_glu_fwd(a.glu, v[ni][0], v[ni + 2][0], a.alpha, a.limit),
                   moe_glu_fwd(a.glu, v[ni][1], v[ni + 2][1], a.alpha, a.limit));
      }
    }
}

#endif  // !SLOTH_HIP

// ------------------------------------------------------------------ grouped GEMM: SIMT path

constexpr int kSimtUnits = 64;  // output units per CTA (8 per 32-lane group)
constexpr int kSimtRows = 4;    // rows per pass over the weights

// 8 consecutive logical k of column n (k-contiguous storage, 16-bit dense or 4-bit) as fp32.
template <OutType T>
__device__ __forceinline__ void load_w8(const MoeGemmArgs& a, int64_t e, int64_t n, int64_t k, float v[8]) {
  const MoeWeight& w = a.w;
  if (w.fmt == kMoeDense) {
    const int64_t s_n = a.trans ? w.s_b : w.s_a;
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(w.data) + e * w.s_e + n * s_n + k);
    const uint32_t p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = w.dense_type == OutType::kBF16 ? bf16_bits_to_float(p[i] & 0xffffu) : fp16_bits_to_float(p[i] & 0xffffu);
      v[2 * i + 1] = w.dense_type == OutType::kBF16 ? bf16_bits_to_float(p[i] >> 16) : fp16_bits_to_float(p[i] >> 16);
    }
    return;
  }
  const int64_t g = (e * w.A + n) * w.B + k;
  const uint32_t word = *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(w.data) + (g >> 1));
  uint32_t bits[4];
  uint8_t mx = 0;
  if (w.fmt == kMoeNf4) decode8<true, T>(word, group_scale<true>(w, g, e, &mx), 0, bits);
  else { const float s = group_scale<false>(w, g, e, &mx); decode8<false, T>(word, s, mx, bits); }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = to_float<T>((typename OutStorage<T>::type)(bits[i] & 0xffffu));
    v[2 * i + 1] = to_float<T>((typename OutStorage<T>::type)(bits[i] >> 16));
  }
}

// Decoded weight element (logical n, k), rounded to T as the tensor-core path feeds it.
template <OutType T>
__device__ __forceinline__ float w_at(const MoeGemmArgs& a, int64_t e, int64_t n, int64_t k) {
  const float v = a.trans ? moe_weight_at(a.w, e, k, n) : moe_weight_at(a.w, e, n, k);
  return a.w.fmt == kMoeDense ? v : to_float<T>(from_float<T>(v));
}

// CTA (unit block, expert e): units are output columns, or GLU outputs (a gate and an up column each).
// Traffic: the expert's weight rows of the CTA's units once per kSimtRows rows of the expert; nothing for
// experts without rows.
template <OutType T, bool kFast>
__global__ void __launch_bounds__(256) moe_gemm_simt_kernel(MoeGemmArgs a) {
  using raw = typename OutStorage<T>::type;
  const int64_t e = blockIdx.y;
  const int64_t lo = a.offsets[e], hi = a.offsets[e + 1];
  if (lo >= hi) return;
  const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5;
  const bool concat = a.glu && !moe_glu_interleaved(a.glu);
  const int64_t Nout = a.glu ? a.N / 2 : a.N;
  const raw* x = static_cast<const raw*>(a.x);
  raw* out = static_cast<raw*>(a.out);
  raw* pre = static_cast<raw*>(a.pre);
  for (int ui = 0; ui < kSimtUnits / 8; ++ui) {
    const int64_t u = (int64_t)blockIdx.x * kSimtUnits + grp * (kSimtUnits / 8) + ui;
    if (u >= Nout) break;
    const int64_t ng = a.glu ? (concat ? u : 2 * u) : u;
    const int64_t nu = a.glu ? (concat ? Nout + u : 2 * u + 1) : u;
    for (int64_t r0 = lo; r0 < hi; r0 += kSimtRows) {
      const int nr = hi - r0 < kSimtRows ? (int)(hi - r0) : kSimtRows;
      int64_t src[kSimtRows];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        const int64_t r = r0 + min(i, nr - 1);
        src[i] = a.rows ? (int64_t)a.rows[r] : r;
        if (src[i] < 0 || src[i] >= a.x_rows) src[i] = -1;  // a bad gather index reads zeros
      }
      float ag[kSimtRows] = {}, au[kSimtRows] = {};
      if (kFast) {
        for (int64_t k = lane * 8; k < a.K; k += 256) {
          float wg[8], wu[8];
          load_w8<T>(a, e, ng, k, wg);
          if (a.glu) load_w8<T>(a, e, nu, k, wu);
#pragma unroll
          for (int i = 0; i < kSimtRows; ++i) {
            const uint4 xv = src[i] < 0 ? make_uint4(0, 0, 0, 0) : *reinterpret_cast<const uint4*>(x + src[i] * a.K + k);
            const uint32_t p[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float x0 = to_float<T>((raw)(p[j] & 0xffffu)), x1 = to_float<T>((raw)(p[j] >> 16));
              ag[i] += x0 * wg[2 * j] + x1 * wg[2 * j + 1];
              if (a.glu) au[i] += x0 * wu[2 * j] + x1 * wu[2 * j + 1];
            }
          }
        }
      } else {
        for (int64_t k = lane; k < a.K; k += 32) {
          const float wg = w_at<T>(a, e, ng, k), wu = a.glu ? w_at<T>(a, e, nu, k) : 0.0f;
#pragma unroll
          for (int i = 0; i < kSimtRows; ++i) {
            const float xv = src[i] < 0 ? 0.0f : to_float<T>(x[src[i] * a.K + k]);
            ag[i] += xv * wg;
            au[i] += xv * wu;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        ag[i] = warp_sum32(ag[i]);
        if (a.glu) au[i] = warp_sum32(au[i]);
      }
      if (lane < nr) {
        float g = 0.0f, up = 0.0f;
#pragma unroll
        for (int i = 0; i < kSimtRows; ++i)
          if (i == lane) { g = ag[i]; up = au[i]; }
        const int64_t r = r0 + lane;
        g = epi_add<T>(a, g, r, e, ng);
        if (!a.glu) {
          out[r * a.N + ng] = from_float<T>(g);
        } else {
          up = epi_add<T>(a, up, r, e, nu);
          if (pre) {
            pre[r * a.N + ng] = from_float<T>(g);
            pre[r * a.N + nu] = from_float<T>(up);
          }
          out[r * Nout + u] = from_float<T>(moe_glu_fwd(a.glu, g, up, a.alpha, a.limit));
        }
      }
    }
  }
}

// ------------------------------------------------------------------ GLU backward, combine

template <OutType T>
__global__ void moe_glu_backward_kernel(const void* dh_, const void* pre_, void* dpre_, int64_t R, int64_t I, int glu,
                                        float alpha, float limit) {
  using raw = typename OutStorage<T>::type;
  const raw* dh = static_cast<const raw*>(dh_);
  const raw* pre = static_cast<const raw*>(pre_);
  raw* dpre = static_cast<raw*>(dpre_);
  const bool inter = moe_glu_interleaved(glu);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < R * I; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / I, j = i % I;
    const int64_t gi = r * 2 * I + (inter ? 2 * j : j), ui = r * 2 * I + (inter ? 2 * j + 1 : I + j);
    float dg, du;
    moe_glu_bwd(glu, to_float<T>(dh[i]), to_float<T>(pre[gi]), to_float<T>(pre[ui]), alpha, limit, &dg, &du);
    dpre[gi] = from_float<T>(dg);
    dpre[ui] = from_float<T>(du);
  }
}

// One CTA per token: out[t] = sum_j w[t, j] y[slot_pos[t * k + j]] in fp32. Traffic: k rows of y, one of out.
template <OutType T>
__global__ void moe_combine_kernel(const void* y_, const int32_t* __restrict__ slot_pos, const float* __restrict__ w,
                                   void* out_, int k, int64_t H, int64_t R) {
  using raw = typename OutStorage<T>::type;
  const raw* y = static_cast<const raw*>(y_);
  raw* out = static_cast<raw*>(out_);
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int64_t p = slot_pos[t * k + j];
      if (p < 0 || p >= R) continue;
      const float c = w ? w[t * k + j] : 1.0f;
      s += c * to_float<T>(y[p * H + h]);
    }
    out[t * H + h] = from_float<T>(s);
  }
}

// One CTA per slot s: dy[slot_pos[s]] = w[s] dout[s / k]; dweights[s] = <dout[s / k], y[slot_pos[s]]>.
template <OutType T>
__global__ void moe_combine_backward_kernel(const void* dout_, const void* y_, const int32_t* __restrict__ slot_pos,
                                            const float* __restrict__ w, void* dy_, float* __restrict__ dweights,
                                            int k, int64_t H) {
  using raw = typename OutStorage<T>::type;
  const raw* dout = static_cast<const raw*>(dout_);
  const raw* y = static_cast<const raw*>(y_);
  raw* dy = static_cast<raw*>(dy_);
  const int64_t s = blockIdx.x, t = s / k, p = slot_pos[s];
  if (p < 0 || p >= (int64_t)gridDim.x) {  // R == T * k == gridDim.x: a bad position writes nothing
    if (threadIdx.x == 0) dweights[s] = 0.0f;
    return;
  }
  const float ws = w[s];
  float dot = 0.0f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float d = to_float<T>(dout[t * H + h]);
    dy[p * H + h] = from_float<T>(ws * d);
    dot += d * to_float<T>(y[p * H + h]);
  }
  __shared__ float s_red[32];
  dot = warp_sum32(dot);
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float acc = 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) acc += s_red[i];
    dweights[s] = acc;
  }
}

int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return (int)(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

}  // namespace

// ------------------------------------------------------------------ launchers

cudaError_t launch_moe_route(const float* logits, int64_t T, int E, int k, int kind, bool renormalize, float* weights,
                             int64_t* ids, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (E > 1024) return cudaErrorInvalidValue;
  constexpr int kTokensPerCta = 8;
  moe_route_kernel<<<(unsigned)((T + kTokensPerCta - 1) / kTokensPerCta), 32 * kTokensPerCta, 0, stream>>>(
      logits, T, E, k, kind, renormalize, weights, ids);
  return cudaGetLastError();
}

int64_t moe_permute_workspace(int64_t R, int E) { return ((R + kChunk - 1) / kChunk + 1) * (E + 1); }

cudaError_t launch_moe_permute(const void* ids, bool ids_int64, int64_t R, int E, int32_t* sorted_slots,
                               int32_t* slot_pos, int32_t* offsets, int32_t* workspace, cudaStream_t stream) {
  if (E > 1024) return cudaErrorInvalidValue;
  const int64_t chunks = (R + kChunk - 1) / kChunk;
  const size_t cnt_smem = (size_t)(E + 1) * sizeof(int32_t);
  const size_t grp_smem = (size_t)(kChunk / 32) * (E + 1) * sizeof(int32_t);
  if (grp_smem > 48 * 1024 - kChunk * sizeof(int32_t)) return cudaErrorInvalidValue;
  if (chunks > 0) {
    if (ids_int64) {
      moe_count_kernel<int64_t><<<(unsigned)chunks, kChunk, cnt_smem, stream>>>(static_cast<const int64_t*>(ids), R,
                                                                                 E, workspace);
    } else {
      moe_count_kernel<int32_t><<<(unsigned)chunks, kChunk, cnt_smem, stream>>>(static_cast<const int32_t*>(ids), R,
                                                                                 E, workspace);
    }
  }
  moe_scan_kernel<<<1, 256, 0, stream>>>(workspace, chunks, E, offsets);
  if (chunks > 0) {
    if (ids_int64) {
      moe_place_kernel<int64_t><<<(unsigned)chunks, kChunk, grp_smem, stream>>>(
          static_cast<const int64_t*>(ids), R, E, workspace, sorted_slots, slot_pos);
    } else {
      moe_place_kernel<int32_t><<<(unsigned)chunks, kChunk, grp_smem, stream>>>(
          static_cast<const int32_t*>(ids), R, E, workspace, sorted_slots, slot_pos);
    }
  }
  return cudaGetLastError();
}

#if !defined(SLOTH_HIP)
// Opt every tensor-core kernel into its dynamic shared memory (above the 48 KiB default), once per device and
// outside any CUDA graph capture that follows the first call.
template <OutType T>
static void tc_set_smem_attributes_for() {
  const int s4 = (int)tc_smem_bytes(4), s3 = (int)tc_smem_bytes(3);
  cudaFuncSetAttribute(moe_gemm_tc_kernel<T, kDenseK, true, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, s4);
  cudaFuncSetAttribute(moe_gemm_tc_kernel<T, kDenseN, true, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, s4);
  cudaFuncSetAttribute(moe_gemm_tc_kernel<T, kQuantK, true, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, s3);
  cudaFuncSetAttribute(moe_gemm_tc_kernel<T, kQuantK, false, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, s3);
  cudaFuncSetAttribute(moe_gemm_tc_kernel<T, kQuantN, true, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, s3);
  cudaFuncSetAttribute(moe_gemm_tc_kernel<T, kQuantN, false, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, s3);
}
static void tc_set_smem_attributes() {
  static bool done[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 0 && dev < 64 && done[dev]) return;
  tc_set_smem_attributes_for<OutType::kBF16>();
  tc_set_smem_attributes_for<OutType::kF16>();
  if (dev >= 0 && dev < 64) done[dev] = true;
}
#endif

int moe_grouped_gemm_path(const MoeGemmArgs& a) {
#if defined(SLOTH_HIP)
  return 0;
#else
  if (a.type == OutType::kF32 || a.R <= 128) return 0;
  if (a.K % 8 || a.N % 8) return 0;
  if (a.glu && !moe_glu_interleaved(a.glu) && (a.N / 2) % 64) return 0;
  if (reinterpret_cast<uintptr_t>(a.x) % 16) return 0;
  const MoeWeight& w = a.w;
  if (w.fmt == kMoeDense) {
    if (w.dense_type != a.type || reinterpret_cast<uintptr_t>(w.data) % 16 || w.s_e % 8) return 0;
    const int64_t s_n = a.trans ? w.s_b : w.s_a, s_k = a.trans ? w.s_a : w.s_b;
    if (!((s_k == 1 && s_n % 8 == 0) || (s_n == 1 && s_k % 8 == 0))) return 0;
  } else if (w.B % 8) {
    return 0;
  }
  return 1;
#endif
}

cudaError_t launch_moe_grouped_gemm(const MoeGemmArgs& a, cudaStream_t stream) {
  if (a.R == 0) return cudaSuccess;
  const int E = (int)a.w.E;
  if (moe_grouped_gemm_path(a) == 1) {
#if !defined(SLOTH_HIP)
    moe_tile_schedule_kernel<<<1, 32, 0, stream>>>(a.offsets, E, a.tile_start);
    const int64_t m_tiles = (a.R + kBM - 1) / kBM + E;  // upper bound of sum ceil(count / 128)
    const int64_t n_tiles = (a.N + kBN - 1) / kBN;
    if (m_tiles > 65535) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)n_tiles, (unsigned)m_tiles);
    const MoeWeight& w = a.w;
    int kind;
    if (w.fmt == kMoeDense) kind = ((a.trans ? w.s_a : w.s_b) == 1) ? 0 : 1;
    else kind = a.trans ? 3 : 2;
    // 4 stages for 16-bit B (cp.async), 3 for 4-bit B (its registers hold one tile in flight)
    tc_set_smem_attributes();
    auto launch = [&](auto kern, int stages) { kern<<<grid, kThreads, tc_smem_bytes(stages), stream>>>(a); };
    auto go = [&](auto tt) {
      constexpr OutType T = decltype(tt)::value;
      switch (kind) {
        case 0: launch(moe_gemm_tc_kernel<T, kDenseK, true, 4>, 4); break;
        case 1: launch(moe_gemm_tc_kernel<T, kDenseN, true, 4>, 4); break;
        case 2:
          if (w.fmt == kMoeNf4) {
            launch(moe_gemm_tc_kernel<T, kQuantK, true, 3>, 3);
          } else {
            launch(moe_gemm_tc_kernel<T, kQuantK, false, 3>, 3);
          }
          break;
        default:
          if (w.fmt == kMoeNf4) {
            launch(moe_gemm_tc_kernel<T, kQuantN, true, 3>, 3);
          } else {
            launch(moe_gemm_tc_kernel<T, kQuantN, false, 3>, 3);
          }
      }
    };
    if (a.type == OutType::kBF16) go(std::integral_constant<OutType, OutType::kBF16>{});
    else go(std::integral_constant<OutType, OutType::kF16>{});
    return cudaGetLastError();
#endif
  }
  const int64_t units = a.glu ? a.N / 2 : a.N;
  const dim3 grid((unsigned)((units + kSimtUnits - 1) / kSimtUnits), (unsigned)E);
  const MoeWeight& w = a.w;
  const int64_t s_n = a.trans ? w.s_b : w.s_a, s_k = a.trans ? w.s_a : w.s_b;
  bool fast = a.type != OutType::kF32 && a.K % 8 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  if (w.fmt == kMoeDense)
    fast = fast && w.dense_type != OutType::kF32 && s_k == 1 && s_n % 8 == 0 && w.s_e % 8 == 0 &&
           reinterpret_cast<uintptr_t>(w.data) % 16 == 0;
  else
    fast = fast && !a.trans;
  dispatch_out_type(a.type, [&](auto tt) {
    constexpr OutType T = decltype(tt)::value;
    if constexpr (T == OutType::kF32) {
      moe_gemm_simt_kernel<T, false><<<grid, 256, 0, stream>>>(a);
    } else {
      if (fast) {
        moe_gemm_simt_kernel<T, true><<<grid, 256, 0, stream>>>(a);
      } else {
        moe_gemm_simt_kernel<T, false><<<grid, 256, 0, stream>>>(a);
      }
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_moe_glu_backward(const void* dh, const void* pre, void* dpre, int64_t R, int64_t I, int glu,
                                    float alpha, float limit, OutType type, cudaStream_t stream) {
  if (R * I == 0) return cudaSuccess;
  dispatch_out_type(type, [&](auto tt) {
    constexpr OutType T = decltype(tt)::value;
    moe_glu_backward_kernel<T><<<blocks_for(R * I, 256), 256, 0, stream>>>(dh, pre, dpre, R, I, glu, alpha, limit);
  });
  return cudaGetLastError();
}

cudaError_t launch_moe_combine(const void* y, const int32_t* slot_pos, const float* w, void* out, int64_t T, int k,
                               int64_t H, int64_t R, OutType type, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  dispatch_out_type(type, [&](auto tt) {
    constexpr OutType TT = decltype(tt)::value;
    moe_combine_kernel<TT><<<(unsigned)T, 256, 0, stream>>>(y, slot_pos, w, out, k, H, R);
  });
  return cudaGetLastError();
}

cudaError_t launch_moe_combine_backward(const void* dout, const void* y, const int32_t* slot_pos, const float* w,
                                        void* dy, float* dweights, int64_t T, int k, int64_t H, OutType type,
                                        cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  dispatch_out_type(type, [&](auto tt) {
    constexpr OutType TT = decltype(tt)::value;
    moe_combine_backward_kernel<TT><<<(unsigned)(T * k), 256, 0, stream>>>(dout, y, slot_pos, w, dy, dweights, k, H);
  });
  return cudaGetLastError();
}

}  // namespace sloth::cuda
