// Portability layer shared by the CPU, CUDA and HIP builds.
//
// SLOTH_HD marks per-element math that runs on host and device. The CUDA sources are
// hipified into csrc/hip; the few intrinsics whose names differ are wrapped here.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SLOTH_HD __host__ __device__ __forceinline__
#define SLOTH_DEVICE_CODE 1
#else
#define SLOTH_HD inline
#endif

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIP_PLATFORM_HCC__)
#define SLOTH_HIP 1
#endif

namespace sloth {

#if defined(SLOTH_DEVICE_CODE)
#if defined(SLOTH_HIP)
constexpr int kWarpSize = 64;  // CDNA wavefront
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) { return __shfl_xor(v, mask); }
#else
constexpr int kWarpSize = 32;
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
#endif
#endif

// fp32 multiply / add that the compiler may not contract into an FMA: bit-exact
// parity with libraries that run the two operations in separate kernels.
SLOTH_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host sources build with -ffp-contract=off
#endif
}
SLOTH_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

}  // namespace sloth
