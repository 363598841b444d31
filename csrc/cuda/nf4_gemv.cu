// Small-M fused QLoRA GEMV: y = x W^T + scaling * (x A^T) B^T + bias with W packed NF4 (bitsandbytes layout,
// fp32 or double-quantized absmax), x [M <= 16, K] bf16 / fp16. The packed weight is streamed once, 16 bytes
// per lane; each byte becomes a bf16 / fp16 pair through one shared-memory lookup (a 256-entry byte -> pair
// table replicated per lane, so lookups never conflict), and m16n8k16 tensor-core MMAs accumulate in fp32: the
// 16 weight rows of a tile are the MMA's M side and the (up to 16) tokens its N side, so x is reused 16x from
// registers. One persistent CTA per SM owns a contiguous range of 16-row tiles (balanced to one tile) and its
// warps split K; their partial sums meet in shared memory. Traffic: N K / 2 bytes of packed weight (+ absmax)
// read once, M K x and M N y.
//
// Kernels, chosen per call by launch_gemv (each where the previous one does not apply):
//   nf4_gemv_lora_v7_kernel (sm_90+, M <= 8, double-quantized absmax, blocksize 64, K % 128 == 0, 32-bit
//     offsets): a producer warp streams the weight into shared memory with bulk async copies; NF4 codes go into
//     the MMAs raw and each 64-block's fp32 scale is applied after the MMA (one rounding of the weight);
//     launched with programmatic dependent launch so one call's prologue overlaps the previous call's tail.
//   nf4_gemv_lora_v5_kernel (the same lane layout from registers; M > 8 or sm_80): tiles reduced several at a
//     time from shared-memory slots when shared memory allows (`slots`), else one barrier per tile.
//   nf4_gemv_lora_kernel<kVariant 4> (double-quantized absmax, 32-bit offsets: byte-permute table lookups) and
//   <kVariant 3> (anything else the GEMV supports).
// Timings and the measurements behind these choices: benchmarks/NOTES.md.

#include <algorithm>
#include <type_traits>

#include "launchers.h"
#include "sloth/nf4.h"
#include "sloth/numeric.h"
#include "sloth/vec.cuh"

namespace sloth::cuda {

#if !defined(SLOTH_HIP)
namespace {

constexpr int kThreads = 512;       // 16 warps, one CTA per SM
constexpr int kWarps = kThreads / 32;
constexpr int kGroupK = 128;        // k per warp step: 4 lanes (c) x 32 elements (16 packed bytes)
constexpr int kChunk = 2;           // groups per pipeline stage and warp
constexpr int kStages = 3;          // register stages: one computed while two are in flight
// k stride between a warp's two groups of an item (slot u), and between an item's chunks: one item (tile, chunk)
// covers kChStride = 4096 elements of K, 32 groups, two per warp.
constexpr int kUStride = kWarps * kGroupK, kChStride = kChunk * kUStride;

// Words per row of the byte -> pair table (32 lanes used): 128-byte rows, or 256-byte rows for the byte-permute
// addressing of kVariant 4 (see lut_entry).
constexpr int lut_stride(int variant) { return variant == 4 ? 64 : 32; }

// Lanes c (of 4) whose MMA columns hold tokens < m (NT == 1: columns 2c, 2c + 1); with NT == 2 all four.
template <int NT>
__host__ __device__ constexpr int slot_lanes(int m) { return NT == 1 ? (m + 1) / 2 : 4; }
// Bytes of one slot of partial sums: [kWarps][8 (g)][slot_lanes (c)][NT * 4] fp32.
template <int NT>
constexpr size_t slot_bytes(int m) { return (size_t)kWarps * 8 * slot_lanes<NT>(m) * NT * 4 * 4; }
// Dynamic shared memory: table, double-quantization code, partial sums (2 slots, or `slots` for variant 6).
template <int NT, int kVariant>
constexpr size_t smem_bytes(int m, int slots = 0) {
  return (256 * lut_stride(kVariant) + 256) * 4 + (slots > 2 ? slots : 2) * slot_bytes<NT>(m);
}

template <OutType T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (T == OutType::kBF16) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
  else asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
  return r;
}

template <OutType T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (T == OutType::kBF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The CTA barrier of the kernels' compute threads: __syncthreads, or (kNamed: variant 7, whose producer warp
// never joins) named barrier 1 over the kThreads compute threads.
template <bool kNamed>
__device__ __forceinline__ void compute_barrier() {
  if constexpr (kNamed) asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory");
  else __syncthreads();
}

// The per-lane byte -> pair table s_lut [256][kStride] (lanes 0..31 of each row used); reads no global memory.
template <OutType T, int kStride>
__device__ void fill_lut(uint32_t* s_lut) {
  // Lane l holds the 16-bit value of code l % 16 (each lane computes one value, not one per entry); the entry of
  // byte v pairs the values of its nibbles, fetched by two shuffles. Warp w writes the rows v = w, w + 16, ...
  const int lane = threadIdx.x % 32;
  const uint32_t val = (uint32_t)from_float<T>(nf4_value(lane & 15));
  for (int v = threadIdx.x / 32; v < 256; v += kThreads / 32) {  // byte: high nibble -> low half of the pair
    const uint32_t lo = __shfl_sync(0xffffffffu, val, v >> 4), hi = __shfl_sync(0xffffffffu, val, v & 15);
    s_lut[v * kStride + lane] = lo | (hi << 16);
  }
}

// The double-quantization code (s_code2 [256]) and, unless kLutReady (filled by the caller), the table; ends with
// the barrier that publishes them.
template <OutType T, int kStride, bool kNamed, bool kLutReady>
__device__ void fill_tables(const Nf4GemvArgs& a, uint32_t* s_lut, float* s_code2) {
  if constexpr (!kLutReady) fill_lut<T, kStride>(s_lut);
  if (a.absmax.code2 != nullptr && threadIdx.x < 256) s_code2[threadIdx.x] = a.absmax.code2[threadIdx.x];
  compute_barrier<kNamed>();
}

// Partial sums of one tile: slot `slot` of s_red ([slots][kWarps][8][cl][NT * 4] fp32, cl = slot_lanes(m)) takes
// this lane's fragment sums (one float4 per token tile) if its columns hold tokens.
template <int NT>
__device__ __forceinline__ void store_partials(float* s_red, const float (&acc)[NT][4], int slot, int warp,
                                               int lane, int cl) {
  const int g = lane >> 2, c = lane & 3;
  if (c >= cl) return;
  float4* red = reinterpret_cast<float4*>(s_red + (((slot * kWarps + warp) * 8 + g) * cl + c) * NT * 4);
#pragma unroll
  for (int j = 0; j < NT; ++j) red[j] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
}

// LoRA term of one output: sum_j t[tok, j] * B[row, j] over the rank, in order (8 at a time from 16-byte loads when
// the rows allow it).
template <OutType T>
__device__ __forceinline__ float lora_dot(const Nf4GemvArgs& a, int tok, int64_t row, bool vec) {
  using raw = typename OutStorage<T>::type;
  const raw* lt = static_cast<const raw*>(a.lora_t) + (int64_t)tok * a.rank;
  const raw* lb = static_cast<const raw*>(a.lora_B) + row * a.rank;
  float l = 0.0f;
  if (vec) {
#pragma unroll 1
    for (int j = 0; j < a.rank; j += 8) {
      const uint4 tv = __ldg(reinterpret_cast<const uint4*>(lt + j));
      const uint4 bv = __ldg(reinterpret_cast<const uint4*>(lb + j));
      const raw* tp = reinterpret_cast<const raw*>(&tv);
      const raw* bp = reinterpret_cast<const raw*>(&bv);
#pragma unroll
      for (int q = 0; q < 8; ++q) l = fmaf(to_float<T>(tp[q]), to_float<T>(bp[q]), l);
    }
  } else {
    for (int j = 0; j < a.rank; ++j) l = fmaf(to_float<T>(lt[j]), to_float<T>(lb[j]), l);
  }
  return l;
}

// Tile epilogue of `count` tiles (tile0 + i in slot slot0 + i of s_red, all kWarps partial sums stored and
// published by a barrier): one thread per fragment value (consecutive threads read consecutive words: no bank
// conflicts) sums the kWarps partials of its (token, row) if the token is < M, adds the LoRA term and bias,
// stores y.
template <OutType T, int NT>
__device__ void reduce_tiles(const Nf4GemvArgs& a, const float* s_red, int slot0, int64_t tile0, int count) {
  using raw = typename OutStorage<T>::type;
  const raw* bias = static_cast<const raw*>(a.bias);
  raw* y = static_cast<raw*>(a.y);
  const int cl = slot_lanes<NT>(a.m), per_warp = 8 * cl * NT * 4;  // floats: [8 (g)][cl (c)][NT (j)][4 (q)]
  const bool vec = a.lora_t != nullptr && a.rank % 8 == 0 &&
                   ((reinterpret_cast<uintptr_t>(a.lora_t) | reinterpret_cast<uintptr_t>(a.lora_B)) & 15) == 0;
  for (int o = threadIdx.x; o < count * per_warp; o += kThreads) {
    const int i = o / per_warp, src = o % per_warp;
    const int q = src % 4, j = (src / 4) % NT, c = (src / (4 * NT)) % cl, g = src / (4 * NT * cl);
    const int tok = 8 * j + 2 * c + (q & 1), r16 = g + 8 * (q >> 1);  // C fragment: c0, c1 row g; c2, c3 g + 8
    const int64_t row = (tile0 + i) * 16 + r16;
    if (tok >= a.m || row >= a.n) continue;
    const float* red = s_red + (slot0 + i) * kWarps * per_warp + src;
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarps; ++p) s += red[p * per_warp];
    if (a.lora_t != nullptr) s = fmaf(a.scaling, lora_dot<T>(a, tok, row, vec), s);
    if (bias != nullptr) s += to_float<T>(bias[row]);
    y[(int64_t)tok * a.n + row] = from_float<T>(s);
  }
}

// The per-warp item loop of all kernels: the first kStages - 1 items' loads are issued before the tables are
// filled (so their latency overlaps the fill), then each item is computed while the loads of the next
// kStages - 1 are in flight. After a tile's last chunk its partial sums go to shared memory. slots == 0: every
// tile is reduced at once (s_red holds 2 slots, by tile parity: one barrier per tile, every warp waits for the
// slowest). slots > 0 (variant 6): tiles fill `slots` slots and are reduced together when the slots are full or
// the CTA's tiles end (two barriers per `slots` tiles), so warps drift apart within a round and their loads,
// lookups and MMAs overlap instead of meeting at a barrier per tile. kLutReady: the caller filled the table.
template <OutType T, int NT, int kLutStride, bool kNamed = false, bool kLutReady = false, class StageT, class Load,
          class Compute>
__device__ __forceinline__ void stream_items(const Nf4GemvArgs& a, StageT (&st)[kStages], float (&acc)[NT][4],
                                             uint32_t* s_lut, float* s_code2, float* s_red, int slots, int items,
                                             int nch, int64_t t0, int warp, int lane, Load& load,
                                             Compute& compute) {
#pragma unroll
  for (int p = 0; p < kStages - 1; ++p)
    if (p < items) load(st[p]);
  fill_tables<T, kLutStride, kNamed, kLutReady>(a, s_lut, s_code2);
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  const int n_tiles = items / nch, cl = slot_lanes<NT>(a.m);
  int cp_ch = 0, cp_tile = 0, slot = 0;  // tile index within the CTA's range, its slot (slots > 0)
  for (int i0 = 0; i0 < items; i0 += kStages) {
#pragma unroll
    for (int p = 0; p < kStages; ++p) {
      const int i = i0 + p;
      if (i >= items) break;
      if (i + kStages - 1 < items) load(st[(p + kStages - 1) % kStages]);
      compute(st[p], cp_ch);
      if (++cp_ch == nch) {
        if (slots == 0) {
          store_partials<NT>(s_red, acc, cp_tile & 1, warp, lane, cl);
          compute_barrier<kNamed>();
          reduce_tiles<T, NT>(a, s_red, cp_tile & 1, t0 + cp_tile, 1);
        } else {
          store_partials<NT>(s_red, acc, slot, warp, lane, cl);
          if (slot == slots - 1 || cp_tile == n_tiles - 1) {
            compute_barrier<kNamed>();
            reduce_tiles<T, NT>(a, s_red, 0, t0 + cp_tile - slot, slot + 1);
            compute_barrier<kNamed>();
            slot = -1;
          }
          ++slot;
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        cp_ch = 0;
        ++cp_tile;
      }
    }
  }
}

// One pipeline stage of a warp: kChunk K-groups of the weight rows g and g + 8 of one tile.
struct Stage {
  uint4 w[kChunk][2];
  uint32_t q[kChunk][2];   // fp32 absmax bits, or the double-quantization index
  float s2[kChunk][2];     // absmax2 of the block (double quantization)
};

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

// Table entry of byte j of word w for this lane. kPerm (table rows 256 bytes apart, lut = the table's shared
// address, lane4 = 4 * lane): one byte permute builds the row offset | lane offset. Otherwise (rows 128 bytes
// apart, lut = the address of this lane's column): shift, mask and add.
template <bool kPerm>
__device__ __forceinline__ uint32_t lut_entry(uint32_t lut, uint32_t lane4, uint32_t w, int j) {
  if constexpr (kPerm) return lds32(lut + __byte_perm(w, lane4, 0x5504u | (j << 4)));
  else return lds32(lut + (((w >> (8 * j)) & 0xffu) << 7));
}

// CTA `blockIdx.x` computes the 16-row tiles [t0, t1) of y. Lane (g = lane / 4, c = lane % 4) of warp w owns,
// in each K-group j (128 elements) with j % 16 == w, the 32 elements [128 j + 32 c, +32) of rows g and g + 8
// (16 bytes each) and of tokens g (and g + 8): the MMA's k order is permuted identically on both sides, so no
// shuffles are needed. The items a warp streams are (tile, chunk) pairs in order, kStages - 1 ahead of the one
// it computes; every warp has the same item sequence, so the per-tile barriers line up. Integer work is kept
// lean: the (tile, chunk) cursors advance by increments (no divisions), k offsets are 32-bit (K < 2^30), the
// absmax2 factor is loaded with the stage, and table lookups use 32-bit shared addresses.
// kVariant 4 (double-quantized absmax and N * K < 2^31 only; variant 3 covers the rest): element
// offsets in 32 bits, double quantization known at compile time, and each table lookup addressed by one byte
// permute (256-byte table rows: 64 KB). Static SASS on sm_90a (bf16, M <= 8) per streamed item (one stage
// load + two groups: 16 HMMA, 64 LDS): variant 3 661 instructions (369 integer), variant 4 425 (100 integer).
// Traffic: reads N * K / 2 packed bytes once (+ N * K / blocksize absmax bytes, + N * r * sizeof(T) for B),
// x [M, K] per CTA (L1 / L2 resident), writes M * N * sizeof(T).
template <OutType T, int NT, int kVariant>
__global__ void __launch_bounds__(kThreads, 1) nf4_gemv_lora_kernel(Nf4GemvArgs a) {
  using raw = typename OutStorage<T>::type;
  constexpr bool v4 = kVariant == 4;
  constexpr int kLutStride = lut_stride(kVariant);
  using eidx = std::conditional_t<v4, uint32_t, int64_t>;  // element offset into W (or x)
  using ridx = std::conditional_t<v4, int, int64_t>;       // row / tile index
  extern __shared__ uint32_t smem[];
  uint32_t* s_lut = smem;                                               // [256 bytes][kLutStride] pairs of T
  float* s_code2 = reinterpret_cast<float*>(smem + 256 * kLutStride);  // [256] double-quantization code
  float* s_red = s_code2 + 256;                                         // [2] slots of partial sums (store_partials)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;
  const int64_t n_tiles = (a.n + 15) / 16;
  const int64_t t0 = blockIdx.x * n_tiles / gridDim.x, t1 = (blockIdx.x + 1) * n_tiles / gridDim.x;
  const int k = (int)a.k;  // K < 2^30 (nf4_gemv_supported): every k offset below fits in an int
  const int n_groups = (k + kGroupK - 1) / kGroupK;
  const int nch = (n_groups + kWarps * kChunk - 1) / (kWarps * kChunk);
  const int items = (int)(t1 - t0) * nch;
  // k offset of this lane's slot u of chunk ch: kbase + ch * kChStride + u * kUStride.
  const int kbase = warp * kGroupK + 32 * c;
  const bool dq = v4 || a.absmax.absmax == nullptr;
  const int log2_bs = __ffs(a.blocksize) - 1, log2_bs2 = a.absmax.log2_blocksize2;
  const float offset = dq ? __ldg(a.absmax.offset) : 0.0f;
  const uint32_t lut = (uint32_t)__cvta_generic_to_shared(v4 ? s_lut : s_lut + lane), lane4 = 4 * lane;
  // x rows of tokens g (+ 8): a pointer each, or (kVariant 4) a 32-bit offset each. Tokens past M read row
  // M - 1; kVariant 3 zeroes them, kVariant 4 keeps them (their MMA columns are never stored).
  const raw* x = static_cast<const raw*>(a.x);
  const raw* xr[NT];
  eidx xo[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    xo[j] = (eidx)min(g + 8 * j, a.m - 1) * (eidx)k;
    xr[j] = x + (int64_t)min(g + 8 * j, a.m - 1) * k;
  }

  // Load cursor: the next (tile, chunk) to stream, with the element offsets of its rows g and g + 8.
  int ld_ch = 0;
  ridx ld_tile = (ridx)t0;
  eidx ld_rowk[2];
  auto set_rows = [&]() {
    const ridx n1 = (ridx)(a.n - 1), kr = (ridx)a.k;
    ld_rowk[0] = (eidx)(min(ld_tile * 16 + g, n1) * kr);  // clamped: rows past n are discarded
    ld_rowk[1] = (eidx)(min(ld_tile * 16 + g + 8, n1) * kr);
  };
  set_rows();
  auto load = [&](Stage& s) {
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int kk = kbase + ld_ch * kChStride + u * kUStride;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const eidx e = ld_rowk[h] + kk;
        const eidx blk = e >> log2_bs;
        const bool in = kk < k;
        s.w[u][h] = in ? __ldg(reinterpret_cast<const uint4*>(a.packed + (e >> 1))) : make_uint4(0, 0, 0, 0);
        s.q[u][h] = in ? (dq ? (uint32_t)__ldg(a.absmax.absmax_q + blk) : __float_as_uint(__ldg(a.absmax.absmax + blk)))
                       : 0u;
        s.s2[u][h] = in && dq ? __ldg(a.absmax.absmax2 + (blk >> log2_bs2)) : 0.0f;
      }
    }
    if (++ld_ch == nch) {
      ld_ch = 0;
      ++ld_tile;
      set_rows();
    }
  };

  float acc[NT][4];
  auto compute = [&](const Stage& s, int ch) {
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int kk = kbase + ch * kChStride + u * kUStride;
      const bool in = kk < k;
      if (__all_sync(0xffffffffu, !in)) continue;  // the whole group is past K
      float f[2];
#pragma unroll
      for (int h = 0; h < 2; ++h)  // bitsandbytes' order: code2 * absmax2 + offset
        f[h] = !in ? 0.0f : dq ? __fadd_rn(__fmul_rn(s_code2[s.q[u][h]], s.s2[u][h]), offset) : __uint_as_float(s.q[u][h]);
      const uint32_t sa = pack2<T>(f[0], f[0]), sb = pack2<T>(f[1], f[1]);
      uint4 xv[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const bool xin = in && (v4 || g + 8 * j < a.m);
        const uint4* xp = reinterpret_cast<const uint4*>(v4 ? x + (xo[j] + kk) : xr[j] + kk);
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[j][q] = xin ? __ldg(xp + q) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int t = 0; t < 8; ++t) {  // MMA tile t: bytes 2t, 2t + 1 of the lane's 16
        const uint32_t wa = word_of(s.w[u][0], t >> 1), wb = word_of(s.w[u][1], t >> 1);
        const int j0 = 2 * (t & 1);
        const uint32_t a0 = mul2<T>(lut_entry<v4>(lut, lane4, wa, j0), sa);
        const uint32_t a2 = mul2<T>(lut_entry<v4>(lut, lane4, wa, j0 + 1), sa);
        const uint32_t a1 = mul2<T>(lut_entry<v4>(lut, lane4, wb, j0), sb);
        const uint32_t a3 = mul2<T>(lut_entry<v4>(lut, lane4, wb, j0 + 1), sb);
#pragma unroll
        for (int j = 0; j < NT; ++j)
          mma16816<T>(acc[j], a0, a1, a2, a3, word_of(xv[j][t >> 1], 2 * (t & 1)),
                      word_of(xv[j][t >> 1], 2 * (t & 1) + 1));
      }
    }
  };

  Stage st[kStages];
  stream_items<T, NT, kLutStride>(a, st, acc, s_lut, s_code2, s_red, 0, items, nch, t0, warp, lane, load,
                                  compute);
}

// ---- nf4_gemv_lora_v5_kernel (slots > 0: tiles reduced several at a time; v5_applies) ----
// Each MMA's 16 k-values of a weight row lie inside ONE quantization block, so the MMAs take the raw NF4 code
// values (the same byte -> pair table, no absmax multiply) into a zero-initialised fp32 fragment per block, which
// is folded into the accumulator with the block's fp32 scale per row (4 FFMA per block and token tile, instead of
// 16 HMUL2 on the A fragments). Needs blocksize 64 and K % 128 == 0 (see v5_applies).
//
// Fragment layout (mma.m16n8k16, lane = 4 g + c): A a0 = (row g, k 2c..2c+1), a1 = (row g+8, k 2c..2c+1),
// a2 = (row g, k 2c+8..2c+9), a3 = (row g+8, k 2c+8..2c+9); B b0 = (k 2c..2c+1, col g), b1 = (k 2c+8..2c+9,
// col g); C c0, c1 = (row g, cols 2c, 2c+1), c2, c3 = (row g+8, cols 2c, 2c+1).
// A K-group (128 elements, warp w owns the groups j with j % 16 == w, as in variants 3 / 4) is two halves of 64
// elements: the quantization blocks 2b and 2b + 1 of a row (K % 128 == 0: every row starts on an even block).
// Lane c holds the 16 elements [64 hf + 16 c, +16) of half hf, i.e. 8 packed bytes (one 8-byte load per row and
// half: 16 bytes per row and group, as before), and the same 16 elements of x for tokens g (and g + 8). MMA t
// (0..3) of half hf uses the lane's bytes 2t (-> a0 / a1) and 2t + 1 (-> a2 / a3), i.e. k slot 2c + i <- element
// 64 hf + 16 c + 4 t + i and k slot 2c + 8 + i <- element 64 hf + 16 c + 4 t + 2 + i (i = 0, 1), and x words 2t
// (b0) and 2t + 1 (b1) of the lane's 8 words of that half: the same k permutation on both sides, depending only
// on (c, t, i); the 16 k values of MMA t are {64 hf + 16 c + 4 t + 0..3 : c = 0..3}, all inside block hf.
// The two absmax bytes of a group (blocks 2b, 2b + 1) are one 16-bit load, and they share one absmax2 (its
// blocks cover an even number of blocks, aligned). K % 128 == 0 makes every group all-in or all-out of K for the
// whole warp: out-of-K groups are skipped by a uniform branch, their loads predicated off (no zero fill), x is
// loaded only for groups that are computed.
struct Stage5 {
  uint2 w[kChunk][2][2];   // [group][row g / g + 8][half]: 8 packed bytes
  uint32_t q[kChunk][2];   // the absmax_q bytes of blocks 2b (low byte) and 2b + 1 of the group, per row
  float s2[kChunk][2];     // absmax2 of those blocks, per row
};

template <OutType T>
__device__ __forceinline__ void mma16816_zero(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
  const float z = 0.0f;
  if constexpr (T == OutType::kBF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};"
                 : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};"
                 : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z));
}

// Predicated read-only loads (inline PTX, so that the compiler can neither speculate them nor zero-fill the
// registers when the predicate is off: those keep their previous contents).
__device__ __forceinline__ void ldg_pred(uint2& v, const void* p, bool pred) {
  asm("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n @q ld.global.nc.v2.u32 {%0, %1}, [%2];\n}"
      : "+r"(v.x), "+r"(v.y) : "l"(p), "r"((int)pred));
}
__device__ __forceinline__ void ldg_pred(float& v, const void* p, bool pred) {
  asm("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.global.nc.f32 %0, [%1];\n}" : "+f"(v) : "l"(p), "r"((int)pred));
}
__device__ __forceinline__ void ldg_pred_u16(uint32_t& v, const void* p, bool pred) {
  asm("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.global.nc.u16 %0, [%1];\n}" : "+r"(v) : "l"(p), "r"((int)pred));
}

// One K-group of a warp in variant 5-7's lane layout: the fp32 scales of blocks 2b, 2b + 1 of rows g, g + 8
// (bitsandbytes' order, code2 * absmax2 + offset, from the absmax bytes q and absmax2 s2 of each row), the MMAs
// on the raw NF4 code pairs of w ([row g / g + 8][half], 8 bytes each) against x (xv [token tile][half 0: 0, 1;
// half 1: 2, 3]) into a fresh fragment per block, folded into acc with the block's scale.
template <OutType T, int NT>
__device__ __forceinline__ void group_mma(const uint2 (&w)[2][2], const uint4 (&xv)[NT][4], const uint32_t (&q)[2],
                                          const float (&s2)[2], const float* s_code2, float offset, uint32_t lut,
                                          uint32_t lane4, float (&acc)[NT][4]) {
  float sc[2][2];  // [row g / g + 8][half]
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) sc[h][hf] = __fadd_rn(__fmul_rn(s_code2[(q[h] >> (8 * hf)) & 0xffu], s2[h]), offset);
  // The two halves' MMA chains interleaved (NT == 1), or one half after the other (NT == 2: fewer live fragment
  // registers, no spills).
  constexpr int kTogether = NT == 1 ? 2 : 1;
#pragma unroll
  for (int hb = 0; hb < 2; hb += kTogether) {
    float tmp[kTogether][NT][4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {  // MMA t of each half: bytes 2t, 2t + 1 of the lane's 8
#pragma unroll
      for (int hh = 0; hh < kTogether; ++hh) {
        const int hf = hb + hh;
        const uint32_t wa = t < 2 ? w[0][hf].x : w[0][hf].y;
        const uint32_t wb = t < 2 ? w[1][hf].x : w[1][hf].y;
        const int j0 = 2 * (t & 1);
        const uint32_t a0 = lut_entry<true>(lut, lane4, wa, j0), a2 = lut_entry<true>(lut, lane4, wa, j0 + 1);
        const uint32_t a1 = lut_entry<true>(lut, lane4, wb, j0), a3 = lut_entry<true>(lut, lane4, wb, j0 + 1);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4& xw = xv[j][2 * hf + (t >> 1)];
          const uint32_t b0 = word_of(xw, 2 * (t & 1)), b1 = word_of(xw, 2 * (t & 1) + 1);
          if (t == 0) mma16816_zero<T>(tmp[hh][j], a0, a1, a2, a3, b0, b1);
          else mma16816<T>(tmp[hh][j], a0, a1, a2, a3, b0, b1);
        }
      }
    }
#pragma unroll
    for (int hh = 0; hh < kTogether; ++hh)
#pragma unroll
      for (int j = 0; j < NT; ++j) {  // C: c0, c1 row g; c2, c3 row g + 8
        const int hf = hb + hh;
        acc[j][0] = fmaf(sc[0][hf], tmp[hh][j][0], acc[j][0]);
        acc[j][1] = fmaf(sc[0][hf], tmp[hh][j][1], acc[j][1]);
        acc[j][2] = fmaf(sc[1][hf], tmp[hh][j][2], acc[j][2]);
        acc[j][3] = fmaf(sc[1][hf], tmp[hh][j][3], acc[j][3]);
      }
  }
}

// slots == 0: one barrier per tile (variant 5); slots > 0: variant 6, tiles reduced `slots` at a time (see
// stream_items); s_red then holds max(slots, 2) slots.
template <OutType T, int NT>
__global__ void __launch_bounds__(kThreads, 1) nf4_gemv_lora_v5_kernel(Nf4GemvArgs a, int slots) {
  using raw = typename OutStorage<T>::type;
  constexpr int kLutStride = lut_stride(4);
  extern __shared__ uint32_t smem[];
  uint32_t* s_lut = smem;                                               // [256 bytes][kLutStride] pairs of T
  float* s_code2 = reinterpret_cast<float*>(smem + 256 * kLutStride);  // [256] double-quantization code
  float* s_red = s_code2 + 256;                                         // [max(slots, 2)] slots (store_partials)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;
  const int64_t n_tiles = (a.n + 15) / 16;
  const int64_t t0 = blockIdx.x * n_tiles / gridDim.x, t1 = (blockIdx.x + 1) * n_tiles / gridDim.x;
  const int k = (int)a.k;                 // K % 128 == 0, N * K < 2^31: element offsets in 32 bits
  const int n_groups = k / kGroupK;
  const int nch = (n_groups + kWarps * kChunk - 1) / (kWarps * kChunk);
  const int items = (int)(t1 - t0) * nch;
  // Group start (k) of slot u of chunk ch: kbase + ch * kChStride + u * kUStride; the same for the whole warp.
  const int kbase = warp * kGroupK;
  const int log2_bs2 = a.absmax.log2_blocksize2;
  const float offset = __ldg(a.absmax.offset);
  const uint32_t lut = (uint32_t)__cvta_generic_to_shared(s_lut), lane4 = 4 * lane;
  // x: 32-bit offset of this lane's 16 elements of half 0 in the rows of tokens g (+ 8); tokens past M read row
  // M - 1 (their MMA columns are never stored).
  const raw* x = static_cast<const raw*>(a.x);
  uint32_t xo[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xo[j] = (uint32_t)min(g + 8 * j, a.m - 1) * (uint32_t)k + 16 * c;

  // Load cursor: the next (tile, chunk) to stream, with the element offsets of its rows g and g + 8.
  int ld_ch = 0;
  int ld_tile = (int)t0;
  uint32_t ld_rowk[2];
  auto set_rows = [&]() {
    const int n1 = (int)(a.n - 1);
    ld_rowk[0] = (uint32_t)min(ld_tile * 16 + g, n1) * (uint32_t)k;  // clamped: rows past n are discarded
    ld_rowk[1] = (uint32_t)min(ld_tile * 16 + g + 8, n1) * (uint32_t)k;
  };
  set_rows();
  // Byte offsets (32 bits) from a.packed / absmax_q; rows and groups differ by immediates, out-of-K groups keep
  // whatever their stage registers held (predicated loads: no zero fill, no branch).
  const uint8_t* wbase = a.packed + 8 * c;
  const uint8_t* qbase = a.absmax.absmax_q;
  const float* s2base = a.absmax.absmax2;
  auto load = [&](Stage5& s) {
    const int kk0 = kbase + ld_ch * kChStride;
    bool in[kChunk];
#pragma unroll
    for (int u = 0; u < kChunk; ++u) in[u] = kk0 + u * kUStride < k;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t e0 = ld_rowk[h] + (uint32_t)kk0;  // element offset of the stage's first group in W
      const uint8_t* wp = wbase + (e0 >> 1);
      const uint8_t* qp = qbase + (e0 >> 6);            // block 2b of the first group
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        ldg_pred(s.w[u][h][0], wp + u * (kUStride / 2), in[u]);
        ldg_pred(s.w[u][h][1], wp + u * (kUStride / 2) + 32, in[u]);  // + 64 elements: half 1
        ldg_pred_u16(s.q[u][h], qp + u * (kUStride / 64), in[u]);
        ldg_pred(s.s2[u][h], s2base + (((e0 >> 6) + u * (kUStride / 64)) >> log2_bs2), in[u]);
      }
    }
    if (++ld_ch == nch) {
      ld_ch = 0;
      ++ld_tile;
      set_rows();
    }
  };

  float acc[NT][4];
  auto compute = [&](const Stage5& s, int ch) {
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int kk = kbase + ch * kChStride + u * kUStride;
      // Warp-uniform (kk depends on the warp only), but the vote makes that visible to the compiler, which then
      // keeps the table base in a uniform register (LDS [R + UR]) instead of adding it per lookup.
      if (__all_sync(0xffffffffu, kk >= k)) continue;  // the whole group is past K
      uint4 xv[NT][4];        // [token tile][half 0: 0, 1; half 1: 2, 3]
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + (xo[j] + (uint32_t)kk));
        xv[j][0] = __ldg(xp);
        xv[j][1] = __ldg(xp + 1);
        xv[j][2] = __ldg(xp + 8);  // + 64 elements
        xv[j][3] = __ldg(xp + 9);
      }
      group_mma<T, NT>(s.w[u], xv, s.q[u], s.s2[u], s_code2, offset, lut, lane4, acc);
    }
  };

  Stage5 st[kStages] = {};  // defined contents for the predicated-off loads
  stream_items<T, NT, kLutStride>(a, st, acc, s_lut, s_code2, s_red, slots, items, nch, t0, warp, lane, load,
                                  compute);
}

// ---- Variant 7 (sm_90+, M <= 8, the default where it applies; see v7_slots) ----
// Variant 6's math on a Hopper copy pipeline. A 17th (producer) warp streams the packed weight of each item
// (tile, 4096-element K chunk) into shared memory with bulk async copies (cp.async.bulk, one per weight row,
// completing on the stage's mbarrier), up to kSt items ahead; the 16 compute warps read their fragments from
// there (conflict-free LDS.64: rows padded by 32 bytes) and release the stage through a second mbarrier. The
// weight no longer sits in registers while in flight, which frees them for x: with K <= 4096 (one chunk per tile)
// each warp loads its x slice once instead of once per tile. Absmax bytes stay register-staged (kStages items
// ahead, as in variant 5). Traffic as variant 5. (4 stages instead of 3 measured the same at M = 1 on an H200.)
constexpr int kRowPitch = kChStride / 2 + 32;       // bytes per staged weight row: 2048 + 32 (bank offset per row)
constexpr int kStageBytes = 16 * kRowPitch;         // one staged item: 16 rows
constexpr int kSt = 3;                              // staged items in flight per CTA
constexpr int kThreads7 = kThreads + 32;            // 16 compute warps + 1 producer warp

// Dynamic shared memory of variant 7: mbarriers (full / empty per stage, 64 bytes), stages, table, code2, slots.
constexpr size_t smem7_bytes(int m, int slots) {
  return 64 + (size_t)kSt * kStageBytes + (256 * lut_stride(4) + 256) * 4 + (size_t)slots * slot_bytes<1>(m);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // mbarrier / bulk-copy helpers (sm_90+)
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
// bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned), counted on mbarrier bar.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// Programmatic dependent launch: launch_dependents lets the next kernel of the stream, when launched with
// programmatic stream serialization, start on the SMs this grid frees; grid_dependency_wait blocks until the
// previous kernel of the stream has completed and its writes are visible (at once when this kernel was launched
// without the attribute). Nothing may read or write global memory before the wait.
__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

#endif

struct Stage7 {
  uint32_t q[kChunk][2];   // as Stage5
  float s2[kChunk][2];
};

template <OutType T>
__global__ void __launch_bounds__(kThreads7, 1) nf4_gemv_lora_v7_kernel(Nf4GemvArgs a, int slots) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int NT = 1;
  using raw = typename OutStorage<T>::type;
  constexpr int kLutStride = lut_stride(4);
  extern __shared__ __align__(16) uint32_t smem[];
  const uint32_t bars = (uint32_t)__cvta_generic_to_shared(smem);  // full[s] at 8 s, empty[s] at 32 + 8 s
  const uint32_t stages = bars + 64;
  uint32_t* s_lut = smem + (64 + kSt * kStageBytes) / 4;              // [256 bytes][kLutStride] pairs of T
  float* s_code2 = reinterpret_cast<float*>(s_lut + 256 * kLutStride);  // [256] double-quantization code
  float* s_red = s_code2 + 256;                                         // [slots] slots (store_partials)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;
  const int n_tiles = (int)((a.n + 15) / 16);
  const int t0 = (int)((int64_t)blockIdx.x * n_tiles / gridDim.x);
  const int t1 = (int)((int64_t)(blockIdx.x + 1) * n_tiles / gridDim.x);
  const int k = (int)a.k;  // K % 128 == 0, N * K < 2^31
  const int nch = (k + kChStride - 1) / kChStride;
  const int items = (t1 - t0) * nch;
  if (threadIdx.x == 0) {
    launch_dependents();  // the next call's CTAs may take the SMs of this grid's early finishers
#pragma unroll
    for (int s = 0; s < kSt; ++s) {
      mbar_init(bars + 8 * s, 1);             // full: the producer's arrive + the stage's bytes
      mbar_init(bars + 32 + 8 * s, kWarps);  // empty: one arrive per compute warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kWarps) {  // producer: item i into stage i % kSt, once the compute warps released it
    grid_dependency_wait();
    int tile = t0, ch = 0;
    for (int i = 0; i < items; ++i) {
      const int s = i % kSt;
      // Steady state: once the compute warps released the stage. Ramp: once the previous item landed, so that
      // every CTA's first item arrives before the second ones compete for DRAM (measured: 0.9 us less cold).
      if (i >= kSt) mbar_wait(bars + 32 + 8 * s, ((i / kSt) & 1) ^ 1);
      else if (i > 0) mbar_wait(bars + 8 * (s - 1), 0);
      const int rows = min(16, (int)a.n - 16 * tile);
      const int kc = ch * kChStride, bytes = min(kChStride, k - kc) / 2;
      if (lane == 0) mbar_arrive_expect_tx(bars + 8 * s, (uint32_t)(rows * bytes));
      __syncwarp();
      if (lane < rows)
        bulk_copy(stages + s * kStageBytes + lane * kRowPitch,
                  a.packed + (((uint32_t)(16 * tile + lane) * (uint32_t)k + (uint32_t)kc) >> 1), (uint32_t)bytes,
                  bars + 8 * s);
      if (++ch == nch) {
        ch = 0;
        ++tile;
      }
    }
    return;
  }

  // Compute warps: warp w owns the groups w and w + 16 of every chunk (lane layout of variant 5). The table
  // (no global reads) is filled while the previous kernel may still run.
  fill_lut<T, kLutStride>(s_lut);
  grid_dependency_wait();
  const int kbase = warp * kGroupK;
  const int log2_bs2 = a.absmax.log2_blocksize2;
  const float offset = __ldg(a.absmax.offset);
  const uint32_t lut = (uint32_t)__cvta_generic_to_shared(s_lut), lane4 = 4 * lane;
  const raw* x = static_cast<const raw*>(a.x);
  const uint32_t xo = (uint32_t)min(g, a.m - 1) * (uint32_t)k + 16 * c;  // tokens past M read row M - 1

  int ld_ch = 0, ld_tile = t0;
  uint32_t ld_rowk[2];
  auto set_rows = [&]() {
    const int n1 = (int)(a.n - 1);
    ld_rowk[0] = (uint32_t)min(ld_tile * 16 + g, n1) * (uint32_t)k;
    ld_rowk[1] = (uint32_t)min(ld_tile * 16 + g + 8, n1) * (uint32_t)k;
  };
  set_rows();
  const uint8_t* qbase = a.absmax.absmax_q;
  const float* s2base = a.absmax.absmax2;
  auto load = [&](Stage7& s) {  // absmax bytes and absmax2 of the item's groups (as variant 5)
    const int kk0 = kbase + ld_ch * kChStride;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t e0 = ld_rowk[h] + (uint32_t)kk0;
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const bool in = kk0 + u * kUStride < k;
        ldg_pred_u16(s.q[u][h], qbase + (e0 >> 6) + u * (kUStride / 64), in);
        ldg_pred(s.s2[u][h], s2base + (((e0 >> 6) + u * (kUStride / 64)) >> log2_bs2), in);
      }
    }
    if (++ld_ch == nch) {
      ld_ch = 0;
      ++ld_tile;
      set_rows();
    }
  };

  float acc[NT][4];
  uint4 xv[kChunk][1][4];  // this warp's x slices of the current chunk: [group][token tile][half 0: 0, 1; 1: 2, 3]
  int ci = 0;           // items computed so far
  auto compute = [&](const Stage7& s, int ch) {
    const int st = ci % kSt;
    if (nch > 1 || ci == 0) {  // K <= 4096: the same x slice for every tile, loaded once
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const int kk = kbase + ch * kChStride + u * kUStride;
        if (kk >= k) continue;
        const uint4* xp = reinterpret_cast<const uint4*>(x + (xo + (uint32_t)kk));
        xv[u][0][0] = __ldg(xp);
        xv[u][0][1] = __ldg(xp + 1);
        xv[u][0][2] = __ldg(xp + 8);  // + 64 elements
        xv[u][0][3] = __ldg(xp + 9);
      }
    }
    mbar_wait(bars + 8 * st, (ci / kSt) & 1);
    const uint32_t row0 = stages + st * kStageBytes + g * kRowPitch + 8 * c;  // row g; row g + 8 at + 8 pitches
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int kk = kbase + ch * kChStride + u * kUStride;
      if (__all_sync(0xffffffffu, kk >= k)) continue;  // the whole group is past K
      const uint32_t off = row0 + (warp + kWarps * u) * 64;  // the group's 64 bytes in the staged rows
      uint2 w[2][2];                                        // [row g / g + 8][half]
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) w[h][hf] = lds64(off + h * 8 * kRowPitch + hf * 32);
      group_mma<T, 1>(w, xv[u], s.q[u], s.s2[u], s_code2, offset, lut, lane4, acc);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(bars + 32 + 8 * st);  // this warp is done with the stage
    ++ci;
  };

  Stage7 st[kStages] = {};
  stream_items<T, NT, kLutStride, true, true>(a, st, acc, s_lut, s_code2, s_red, slots, items, nch, t0, warp, lane,
                                              load, compute);
#else
  __trap();  // launched only on sm_90+ (v7_slots)
#endif
}

// Variant 5 applies: double-quantized absmax (absmax2 blocks of >= 2 blocks), blocksize 64, K % 128 == 0,
// 32-bit element offsets, a 2-byte aligned absmax_q (read two blocks at a time).
bool v5_applies(const Nf4GemvArgs& args) {
  return args.absmax.absmax == nullptr && args.blocksize == 64 && args.k % 128 == 0 &&
         args.absmax.log2_blocksize2 >= 1 && reinterpret_cast<uintptr_t>(args.absmax.absmax_q) % 2 == 0 &&
         std::max<int64_t>(args.n, args.m) * args.k < (int64_t{1} << 31);
}

// Opts a kernel in to `bytes` of dynamic shared memory when it needs more than it has so far (`opted`: that
// kernel's own, per process); returns false when the device refuses.
template <class Kernel>
bool opt_in(Kernel kernel, size_t bytes, size_t& opted) {
  if (bytes <= opted) return true;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) != cudaSuccess)
    return false;
  opted = bytes;
  return true;
}

template <OutType T, int NT, int kVariant>
void launch_variant(const Nf4GemvArgs& args, unsigned grid, cudaStream_t stream) {
  static size_t opted = 0;
  const size_t smem = smem_bytes<NT, kVariant>(args.m);
  opt_in(nf4_gemv_lora_kernel<T, NT, kVariant>, smem, opted);
  nf4_gemv_lora_kernel<T, NT, kVariant><<<grid, kThreads, smem, stream>>>(args);
}

int device_attribute(cudaDeviceAttr attr, int fallback) {
  int dev = 0, v = fallback;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&v, attr, dev);
  return v;
}

int num_sms() { return device_attribute(cudaDevAttrMultiProcessorCount, 132); }

// Largest dynamic shared memory per block (bytes), read once.
int smem_optin() {
  static const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  return optin;
}

// Variant 6's slots: enough for every tile of a CTA in one round where shared memory allows (up to 16 slots; at
// least 3, else variant 5's per-tile reduction is as good).
template <int NT>
int v6_slots(int m, int64_t tiles_per_cta) {
  const int64_t base = (int64_t)smem_bytes<NT, 4>(m) - 2 * (int64_t)slot_bytes<NT>(m);
  const int64_t room = (smem_optin() - base) / (int64_t)slot_bytes<NT>(m);
  const int64_t slots = std::min<int64_t>({room, 16, tiles_per_cta});
  return slots >= 3 ? (int)slots : 0;
}

template <OutType T, int NT>
void launch_v5(const Nf4GemvArgs& args, unsigned grid, int slots, cudaStream_t stream) {
  static size_t opted = 0;
  const size_t smem = smem_bytes<NT, 4>(args.m, slots);  // the table layout of variant 4
  opt_in(nf4_gemv_lora_v5_kernel<T, NT>, smem, opted);
  nf4_gemv_lora_v5_kernel<T, NT><<<grid, kThreads, smem, stream>>>(args, slots);
}

// Variant 7's slots where it runs (sm_90+, M <= 8, v5_applies), else 0: as many as shared memory holds, up to 16
// and the CTA's tiles.
int v7_slots(const Nf4GemvArgs& args, int64_t tiles_per_cta) {
  static const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 9 || args.m > 8 || !v5_applies(args)) return 0;
  const int64_t room = (smem_optin() - (int64_t)smem7_bytes(args.m, 0)) / (int64_t)slot_bytes<1>(args.m);
  return (int)std::max<int64_t>(0, std::min<int64_t>({room, 16, tiles_per_cta}));
}

template <OutType T>
void launch_v7(const Nf4GemvArgs& args, unsigned grid, int slots, cudaStream_t stream) {
  static size_t opted = 0;
  const size_t smem = smem7_bytes(args.m, slots);
  opt_in(nf4_gemv_lora_v7_kernel<T>, smem, opted);
  // Programmatic stream serialization: the kernel may start while the previous one finishes (it waits for it
  // before touching global memory), so back-to-back calls overlap one's tail with the next one's prologue.
  cudaLaunchAttribute pdl[1];
  pdl[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads7);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = pdl;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, nf4_gemv_lora_v7_kernel<T>, args, slots);  // errors: cudaGetLastError in launch_nf4_gemv_lora
}

template <OutType T, int NT>
void launch_gemv(const Nf4GemvArgs& args, unsigned grid, cudaStream_t stream) {
  const int64_t n_tiles = (args.n + 15) / 16, tiles_per_cta = (n_tiles + grid - 1) / grid;
  const int slots7 = NT == 1 ? v7_slots(args, tiles_per_cta) : 0;
  if (slots7 > 0) {
    launch_v7<T>(args, grid, slots7, stream);
    return;
  }
  if (v5_applies(args)) {
    launch_v5<T, NT>(args, grid, v6_slots<NT>(args.m, tiles_per_cta), stream);
    return;
  }
  const bool v4 = args.absmax.absmax == nullptr && std::max<int64_t>(args.n, args.m) * args.k < (int64_t{1} << 31);
  if (v4)
    launch_variant<T, NT, 4>(args, grid, stream);
  else
    launch_variant<T, NT, 3>(args, grid, stream);
}

}  // namespace

bool nf4_gemv_supported(int m, int64_t k, OutType type) {
  return m >= 1 && m <= 16 && k % 32 == 0 && k > 0 && k < (int64_t{1} << 30) && type != OutType::kF32;
}

cudaError_t launch_nf4_gemv_lora(const Nf4GemvArgs& args, OutType type, cudaStream_t stream) {
  if (!nf4_gemv_supported(args.m, args.k, type)) return cudaErrorNotSupported;
  if (reinterpret_cast<uintptr_t>(args.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(args.x) % 16 != 0)
    return cudaErrorNotSupported;
  if (args.blocksize < 32 || (args.blocksize & (args.blocksize - 1)) != 0) return cudaErrorNotSupported;
  if (args.n == 0) return cudaSuccess;
  // One persistent CTA per SM (no more than there are tiles), each owning a balanced range of tiles.
  const int64_t n_tiles = (args.n + 15) / 16;
  const unsigned grid = (unsigned)std::min<int64_t>(n_tiles, num_sms());
  const bool two = args.m > 8;
  if (type == OutType::kBF16) {
    if (two) launch_gemv<OutType::kBF16, 2>(args, grid, stream);
    else launch_gemv<OutType::kBF16, 1>(args, grid, stream);
  } else {
    if (two) launch_gemv<OutType::kF16, 2>(args, grid, stream);
    else launch_gemv<OutType::kF16, 1>(args, grid, stream);
  }
  return cudaGetLastError();
}

#else  // HIP: no MMA path yet; callers fall back to dequantize + GEMM.

bool nf4_gemv_supported(int, int64_t, OutType) { return false; }
cudaError_t launch_nf4_gemv_lora(const Nf4GemvArgs&, OutType, cudaStream_t) { return cudaErrorNotSupported; }

#endif

}  // namespace sloth::cuda
