// CPU kernels for NF4 quantize / dequantize and blockwise 8-bit quantize (bitsandbytes layout).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sloth/nf4.h"
#include "sloth/numeric.h"
#include "sloth/op_checks.h"

namespace sloth::cpu {
namespace {

constexpr float kNF4[16] = SLOTH_NF4_VALUES;

// absmax of block b, from fp32 absmax or from the double-quantized form.
struct AbsmaxReader {
  const float* absmax_f = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* code2 = nullptr;
  const float* absmax2 = nullptr;
  const float* offset = nullptr;
  int64_t blocksize2 = 256;
  float operator()(int64_t b) const {
    if (absmax_f) return absmax_f[b];
    return add_rn(mul_rn(code2[absmax_q[b]], absmax2[b / blocksize2]), *offset);
  }
};

template <OutType T>
void nf4_quantize_impl(const void* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  using raw = typename OutStorage<T>::type;
  const raw* src = static_cast<const raw*>(x);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
      float amax = 0.0f;  // NaN when the block holds one (it then dequantizes to NaN, as bitsandbytes')
      for (int64_t i = start; i < end; ++i) amax = max_nan(amax, std::fabs(to_float<T>(src[i])));
      absmax[b] = amax;
      const float inv = 1.0f / std::max(amax, kMinAbsmax);
      for (int64_t i = start; i < end; i += 2) {  // blocksize is even: pairs never straddle blocks
        uint8_t hi = nf4_encode(to_float<T>(src[i]) * inv);
        uint8_t lo = i + 1 < end ? nf4_encode(to_float<T>(src[i + 1]) * inv) : nf4_encode(0.0f);
        packed[i / 2] = (uint8_t)((hi << 4) | lo);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& x_, int64_t blocksize) {
  check_float(x_, "nf4_quantize", "x");
  check_nf4_blocksize(blocksize, "nf4_quantize");
  at::Tensor x = x_.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  dispatch_out_type(out_type_of(x.scalar_type()), [&](auto t) {
    nf4_quantize_impl<decltype(t)::value>(x.data_ptr(), n, blocksize, packed.data_ptr<uint8_t>(),
                                          absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize(const at::Tensor& packed_, const at::Tensor& absmax_, at::IntArrayRef shape,
                          int64_t blocksize, at::ScalarType dtype, const std::optional<at::Tensor>& code2,
                          const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                          int64_t blocksize2) {
  check_nf4_dequantize_args(packed_, absmax_, checked_numel(shape, "nf4_dequantize"), blocksize, dtype, code2, absmax2,
                            offset, blocksize2, "nf4_dequantize");
  at::Tensor packed = packed_.contiguous(), absmax = absmax_.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t n = out.numel();
  AbsmaxReader rd;
  at::Tensor c2, a2, off;
  if (absmax.scalar_type() == at::kFloat) {
    rd.absmax_f = absmax.data_ptr<float>();
  } else {
    c2 = code2->contiguous(), a2 = absmax2->contiguous(), off = offset->contiguous();
    rd.absmax_q = absmax.data_ptr<uint8_t>();
    rd.code2 = c2.data_ptr<float>();
    rd.absmax2 = a2.data_ptr<float>();
    rd.offset = off.data_ptr<float>();
    rd.blocksize2 = blocksize2;
  }
  const uint8_t* p = packed.data_ptr<uint8_t>();
  dispatch_out_type(out_type_of(dtype), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    raw* o = reinterpret_cast<raw*>(out.data_ptr());
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float a = rd(b);
        const int64_t end = std::min(n, (b + 1) * blocksize);
        for (int64_t i = b * blocksize; i < end; ++i) {
          const uint8_t byte = p[i >> 1];
          const uint8_t q = (i & 1) ? (byte & 0x0f) : (byte >> 4);
          o[i] = from_float<T>(kNF4[q] * a);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize(const at::Tensor& x_, const at::Tensor& code_,
                                                       int64_t blocksize) {
  check_blockwise8_args(x_, code_, blocksize);
  at::Tensor x = x_.contiguous(), code = code_.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  const float* c = code.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  dispatch_out_type(out_type_of(x.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* src = reinterpret_cast<const raw*>(x.data_ptr());
    at::parallel_for(0, absmax.numel(), 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
        float amax = 0.0f;  // NaN-propagating, as in nf4_quantize_impl
        for (int64_t i = start; i < end; ++i) amax = max_nan(amax, std::fabs(to_float<T>(src[i])));
        am[b] = amax;
        const float inv = 1.0f / std::max(amax, kMinAbsmax);
        for (int64_t i = start; i < end; ++i) qp[i] = code256_encode(c, to_float<T>(src[i]) * inv);
      }
    });
  });
  return {q, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("nf4_dequantize", &nf4_dequantize);
  m.impl("blockwise8_quantize", &blockwise8_quantize);
}

}  // namespace sloth::cpu
