// CPU kernels for MXFP4 quantize / dequantize (OCP MX E2M1 + E8M0, gpt-oss layout).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sloth/mxfp4.h"
#include "sloth/op_checks.h"

namespace sloth::cpu {
namespace {

constexpr float kE2M1[16] = SLOTH_E2M1_VALUES;

std::tuple<at::Tensor, at::Tensor> mxfp4_quantize(const at::Tensor& x_) {
  check_mxfp4_quantize_args(x_, kMxBlock);
  at::Tensor x = x_.contiguous();
  const int64_t rows = x.numel() / kMxBlock;  // one row per 32-block (x.numel() is a multiple of 32)
  const int64_t k = x.size(-1);
  std::vector<int64_t> bshape(x.sizes().begin(), x.sizes().end() - 1), sshape;
  bshape.push_back(k / kMxBlock);
  sshape = bshape;
  bshape.push_back(kMxBlock / 2);
  at::Tensor blocks = at::empty(bshape, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(sshape, x.options().dtype(at::kByte));
  uint8_t* bp = blocks.data_ptr<uint8_t>();
  uint8_t* sp = scales.data_ptr<uint8_t>();
  dispatch_out_type(out_type_of(x.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* src = static_cast<const raw*>(x.data_ptr());
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const raw* v = src + r * kMxBlock;
        float amax = 0.0f;
        for (int i = 0; i < kMxBlock; ++i) amax = max_nan(amax, std::fabs(to_float<T>(v[i])));  // NaN: scale 255
        const uint8_t s = mx_scale_for(amax);
        sp[r] = s;
        const float inv = e8m0_inverse(s);
        for (int j = 0; j < kMxBlock / 2; ++j) {
          const uint8_t lo = e2m1_encode(to_float<T>(v[2 * j]) * inv);
          const uint8_t hi = e2m1_encode(to_float<T>(v[2 * j + 1]) * inv);
          bp[r * (kMxBlock / 2) + j] = (uint8_t)(lo | (hi << 4));
        }
      }
    });
  });
  return {blocks, scales};
}

at::Tensor mxfp4_dequantize(const at::Tensor& blocks_, const at::Tensor& scales_, at::ScalarType dtype) {
  check_mxfp4_dequantize_args(blocks_, scales_, dtype, kMxBlock);
  at::Tensor blocks = blocks_.contiguous(), scales = scales_.contiguous();
  std::vector<int64_t> oshape(blocks.sizes().begin(), blocks.sizes().end() - 2);
  oshape.push_back(blocks.size(-2) * kMxBlock);
  at::Tensor out = at::empty(oshape, blocks.options().dtype(dtype));
  const int64_t rows = scales.numel();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  dispatch_out_type(out_type_of(dtype), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    raw* o = static_cast<raw*>(out.data_ptr());
    at::parallel_for(0, rows, 1024, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t s = sp[r];
        const float scale = e8m0_to_float(s);
        for (int j = 0; j < kMxBlock / 2; ++j) {
          const uint8_t byte = bp[r * (kMxBlock / 2) + j];
          o[r * kMxBlock + 2 * j] = from_float<T>(mx_scale_value(kE2M1[byte & 0x0f], scale, s));
          o[r * kMxBlock + 2 * j + 1] = from_float<T>(mx_scale_value(kE2M1[byte >> 4], scale, s));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("mxfp4_quantize", &mxfp4_quantize);
  m.impl("mxfp4_dequantize", &mxfp4_dequantize);
}

}  // namespace sloth::cpu
