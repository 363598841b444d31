// Small-M fused QLoRA GEMV: y = x W^T + scaling * (x A^T) B^T + bias with W packed NF4 (bitsandbytes layout,
// fp32 or double-quantized absmax), x [M <= 16, K] bf16 / fp16. The packed weight is read once, 16 bytes per
// lane, dequantized in registers to bf16 / fp16 pairs (256-entry byte -> pair LUT in shared memory, one packed
// multiply by the block's absmax) and fed to m16n8k16 tensor-core MMAs with fp32 accumulation: the 16 weight
// rows of a warp are the MMA's M side and the (up to 16) tokens its N side, so the x values are reused 16x from
// registers and no FMA pipe or shared-memory bandwidth limits the GEMV.
#include "launchers.h"
#include "sloth/nf4.h"
#include "sloth/numeric.h"

namespace sloth::cuda {

#if !defined(SLOTH_HIP)
namespace {

constexpr int kThreads = 256;       // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kGroupK = 128;        // k per warp step: 4 lanes (c) x 32 elements (16 packed bytes)
constexpr int kUnroll = 2;          // groups in flight per warp

// Raw absmax of block b, loaded with the weights (no dependent load): fp32 bits, or the uint8 code index and
// absmax2 of double quantization; resolved by absmax_value once the loads have landed.
struct RawAbsmax {
  uint32_t bits;  // fp32 absmax bits, or the uint8 index into code2
  float scale2;   // absmax2[b / blocksize2] (double quantization)
};

__device__ __forceinline__ RawAbsmax load_absmax(const Nf4Absmax& a, int64_t b) {
  if (a.absmax) return {__float_as_uint(__ldg(a.absmax + b)), 0.0f};
  return {(uint32_t)__ldg(a.absmax_q + b), __ldg(a.absmax2 + b / a.blocksize2)};
}

__device__ __forceinline__ float absmax_value(const Nf4Absmax& a, RawAbsmax r, const float* s_code2, float offset) {
  if (a.absmax) return __uint_as_float(r.bits);
  return __fadd_rn(__fmul_rn(s_code2[r.bits], r.scale2), offset);  // bitsandbytes' order: code2 * absmax2 + offset
}

// (lo, hi) -> packed pair of T (bf16x2 / f16x2), lo in the low 16 bits.
template <OutType T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (T == OutType::kBF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// a * b for packed pairs (fma with -0 addend: exact products keep their sign).
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

// The packed pair (NF4[hi nibble] low half, NF4[lo nibble] high half) of the byte in bits 0..7 of v: two
// lookups into the 16-entry table (16 distinct words in 16 banks: conflict-free) merged with one PRMT.
__device__ __forceinline__ uint32_t pair_of(const uint32_t* s_lut, uint32_t v) {
  return __byte_perm(s_lut[(v >> 4) & 0xfu], s_lut[v & 0xfu], 0x7610);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One CTA = `rt` tiles of 16 output rows x (8 / rt) warps splitting K; lane (g = lane / 4, c = lane % 4) loads
// 32 consecutive weight elements (16 bytes) of rows g and g + 8 per 128-wide K group, and the same 32 elements
// of x for tokens g (and g + 8): the MMA's k order is permuted identically on both sides, so no shuffles are
// needed. Partial sums of the K-split warps meet in shared memory (no atomics), then the epilogue adds
// scaling * lora_t B^T and bias and stores y. NT = token tiles of 8 (1 for M <= 8, 2 for M <= 16).
// Traffic: reads N * K / 2 packed bytes once (+ N * K / blocksize absmax bytes, + N * r * sizeof(T) for B),
// x [M, K] per CTA (L1 / L2 resident), writes M * N * sizeof(T).
template <OutType T, int NT>
__global__ void __launch_bounds__(kThreads, 2) nf4_gemv_lora_kernel(Nf4GemvArgs a, int rt) {
  using raw = typename OutStorage<T>::type;
  __shared__ uint32_t s_lut[16];                 // nibble -> NF4 value of T in both 16-bit halves
  __shared__ float s_code2[256];                 // double-quantization code
  __shared__ float s_red[kWarps][32][NT * 4];    // per-warp MMA accumulators
  {
    constexpr float kNF4[16] = SLOTH_NF4_VALUES;
    const int i = threadIdx.x;  // kThreads == 256
    if (i < 16) s_lut[i] = (uint32_t)from_float<T>(kNF4[i]) * 0x10001u;
    if (a.absmax.code2 != nullptr) s_code2[i] = a.absmax.code2[i];
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;
  const int ks = kWarps / rt;                 // warps along K
  const int tile = warp % rt, kphase = warp / rt;
  const int64_t row_cta = (int64_t)blockIdx.x * 16 * rt;
  const int64_t rowA = min(row_cta + tile * 16 + g, a.n - 1);      // clamped: rows past n are discarded
  const int64_t rowB = min(row_cta + tile * 16 + g + 8, a.n - 1);
  const int64_t n_groups = (a.k + kGroupK - 1) / kGroupK;
  const uint8_t* packed = a.packed;
  const raw* x = static_cast<const raw*>(a.x);
  const Nf4Absmax absmax = a.absmax;
  const float offset = absmax.offset != nullptr ? __ldg(absmax.offset) : 0.0f;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  for (int64_t g0 = kphase; g0 < n_groups; g0 += (int64_t)ks * kUnroll) {
    uint4 w[kUnroll][2];
    uint4 xv[kUnroll][NT][4];
    RawAbsmax am[kUnroll][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t kk = (g0 + (int64_t)u * ks) * kGroupK + 32 * c;
      const bool valid = kk < a.k;   // k % 32 == 0: a lane's 32 elements are all in or all out
      const int64_t ea = rowA * a.k + kk, eb = rowB * a.k + kk;
      w[u][0] = valid ? __ldg(reinterpret_cast<const uint4*>(packed + ea / 2)) : make_uint4(0, 0, 0, 0);
      w[u][1] = valid ? __ldg(reinterpret_cast<const uint4*>(packed + eb / 2)) : make_uint4(0, 0, 0, 0);
      am[u][0] = valid ? load_absmax(absmax, ea / a.blocksize) : RawAbsmax{0u, 0.0f};
      am[u][1] = valid ? load_absmax(absmax, eb / a.blocksize) : RawAbsmax{0u, 0.0f};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int tok = g + 8 * j;
        const bool xin = valid && tok < a.m;
        const uint4* xp = reinterpret_cast<const uint4*>(x + (int64_t)tok * a.k + kk);
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[u][j][q] = xin ? __ldg(xp + q) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float fa = absmax_value(absmax, am[u][0], s_code2, offset);
      const float fb = absmax_value(absmax, am[u][1], s_code2, offset);
      const uint32_t sa = pack2<T>(fa, fa), sb = pack2<T>(fb, fb);
#pragma unroll
      for (int t = 0; t < 8; ++t) {  // MMA tile t: elements 4t..4t+3 of the lane's 32 = bytes 2t, 2t+1
        const uint32_t wa = word_of(w[u][0], t >> 1), wb = word_of(w[u][1], t >> 1);
        const int sh = 16 * (t & 1);
        const uint32_t a0 = mul2<T>(pair_of(s_lut, wa >> sh), sa);
        const uint32_t a2 = mul2<T>(pair_of(s_lut, wa >> (sh + 8)), sa);
        const uint32_t a1 = mul2<T>(pair_of(s_lut, wb >> sh), sb);
        const uint32_t a3 = mul2<T>(pair_of(s_lut, wb >> (sh + 8)), sb);
#pragma unroll
        for (int j = 0; j < NT; ++j)
          mma16816<T>(acc[j], a0, a1, a2, a3, word_of(xv[u][j][t >> 1], 2 * (t & 1)),
                      word_of(xv[u][j][t >> 1], 2 * (t & 1) + 1));
      }
    }
  }

#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) s_red[warp][lane][j * 4 + q] = acc[j][q];
  __syncthreads();

  // Epilogue: one thread per (token, row) of the CTA; consecutive threads take consecutive rows.
  const int rows = 16 * rt;
  const raw* lt = static_cast<const raw*>(a.lora_t);
  const raw* lb = static_cast<const raw*>(a.lora_B);
  const raw* bias = static_cast<const raw*>(a.bias);
  raw* y = static_cast<raw*>(a.y);
  for (int o = threadIdx.x; o < rows * a.m; o += kThreads) {
    const int tok = o / rows, rl = o % rows;
    const int64_t row = row_cta + rl;
    if (row >= a.n) continue;
    const int r16 = rl % 16, tt = tok % 8;
    const int src_lane = (r16 % 8) * 4 + tt / 2;
    const int idx = (tok / 8) * 4 + (r16 / 8) * 2 + (tt % 2);
    float s = 0.0f;
    for (int p = 0; p < ks; ++p) s += s_red[p * rt + rl / 16][src_lane][idx];
    if (lt != nullptr) {
      float l = 0.0f;
      for (int jr = 0; jr < a.rank; ++jr)
        l = fmaf(to_float<T>(lt[(int64_t)tok * a.rank + jr]), to_float<T>(lb[row * a.rank + jr]), l);
      s = fmaf(a.scaling, l, s);
    }
    if (bias != nullptr) s += to_float<T>(bias[row]);
    y[(int64_t)tok * a.n + row] = from_float<T>(s);
  }
}

int num_sms() {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

}  // namespace

bool nf4_gemv_supported(int m, int64_t k, OutType type) {
  return m >= 1 && m <= 16 && k % 32 == 0 && k > 0 && type != OutType::kF32;
}

cudaError_t nf4_gemv_lora(const Nf4GemvArgs& args, OutType type, cudaStream_t stream) {
  if (!nf4_gemv_supported(args.m, args.k, type)) return cudaErrorNotSupported;
  if (reinterpret_cast<uintptr_t>(args.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(args.x) % 16 != 0)
    return cudaErrorNotSupported;
  if (args.n == 0) return cudaSuccess;
  // Row tiles per CTA: as many as keep at least one CTA per SM (fewer CTAs re-read x less from L2), else
  // split K over more warps.
  const int sms = num_sms();
  int rt = 4;
  while (rt > 1 && (args.n + 16 * rt - 1) / (16 * rt) < sms) rt /= 2;
  const unsigned grid = (unsigned)((args.n + 16 * rt - 1) / (16 * rt));
  const bool two = args.m > 8;
  if (type == OutType::kBF16) {
    if (two) nf4_gemv_lora_kernel<OutType::kBF16, 2><<<grid, kThreads, 0, stream>>>(args, rt);
    else nf4_gemv_lora_kernel<OutType::kBF16, 1><<<grid, kThreads, 0, stream>>>(args, rt);
  } else {
    if (two) nf4_gemv_lora_kernel<OutType::kF16, 2><<<grid, kThreads, 0, stream>>>(args, rt);
    else nf4_gemv_lora_kernel<OutType::kF16, 1><<<grid, kThreads, 0, stream>>>(args, rt);
  }
  return cudaGetLastError();
}

#else  // HIP: no MMA path yet; callers fall back to dequantize + GEMM.

bool nf4_gemv_supported(int, int64_t, OutType) { return false; }
cudaError_t nf4_gemv_lora(const Nf4GemvArgs&, OutType, cudaStream_t) { return cudaErrorNotSupported; }

#endif

}  // namespace sloth::cuda
