// CPU kernels for RMSNorm (forward / backward) and RoPE (in place or into new tensors). Math: csrc/include/sloth/norm_rope.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "sloth/norm_rope.h"
#include "sloth/numeric.h"
#include "sloth/op_checks.h"

namespace sloth::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_, const at::Tensor& w_, double eps,
                                                    double offset, bool cast_before_weight) {
  check_norm_args(x_, w_, "rms_norm_forward");
  at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  float* r = rstd.data_ptr<float>();
  dispatch_out_type(out_type_of(x.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* xp = reinterpret_cast<const raw*>(x.data_ptr());
    const raw* wp = reinterpret_cast<const raw*>(w.data_ptr());
    raw* yp = reinterpret_cast<raw*>(y.data_ptr());
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const raw* xr = xp + row * H;
        float ss = 0.f;
        for (int64_t j = 0; j < H; ++j) {
          const float v = to_float<T>(xr[j]);
          ss += v * v;
        }
        const float rs = rms_norm_rstd(ss, H, (float)eps);
        r[row] = rs;
        for (int64_t j = 0; j < H; ++j)
          yp[row * H + j] = rms_norm_y<T>(to_float<T>(xr[j]), rs, to_float<T>(wp[j]), (float)offset, cast_before_weight);
      }
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_,
                                                     const at::Tensor& rstd_, double offset, bool cast_before_weight,
                                                     bool compute_dw) {
  check_rms_norm_backward_args(dy_, x_, w_, rstd_);
  at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous(), rstd = rstd_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({compute_dw ? H : 0}, x.options().dtype(at::kFloat));
  const float* r = rstd.data_ptr<float>();
  dispatch_out_type(out_type_of(x.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* xp = reinterpret_cast<const raw*>(x.data_ptr());
    const raw* dyp = reinterpret_cast<const raw*>(dy.data_ptr());
    const raw* wp = reinterpret_cast<const raw*>(w.data_ptr());
    raw* dxp = reinterpret_cast<raw*>(dx.data_ptr());
    // dw: per-chunk fp32 partials, summed in chunk order afterwards (deterministic).
    const int64_t grain = 64;
    const int64_t chunks = (rows + grain - 1) / grain;
    std::vector<float> partial(compute_dw ? (size_t)(chunks * H) : 0, 0.f);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* acc = compute_dw ? partial.data() + c * H : nullptr;
        for (int64_t row = c * grain; row < std::min(rows, (c + 1) * grain); ++row) {
          const raw* xr = xp + row * H;
          const raw* dr = dyp + row * H;
          const float rs = r[row];
          float dot = 0.f;
          for (int64_t j = 0; j < H; ++j)
            dot += to_float<T>(dr[j]) * ((float)offset + to_float<T>(wp[j])) * (to_float<T>(xr[j]) * rs);
          dot /= (float)H;
          for (int64_t j = 0; j < H; ++j) {
            const float xv = to_float<T>(xr[j]), d = to_float<T>(dr[j]);
            const float g = (float)offset + to_float<T>(wp[j]);
            dxp[row * H + j] = from_float<T>(rs * (d * g - xv * rs * dot));
            if (acc) acc[j] += d * rms_norm_n<T>(xv, rs, cast_before_weight);
          }
        }
      }
    });
    if (compute_dw) {
      float* dwp = dw.data_ptr<float>();
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t j = 0; j < H; ++j) dwp[j] += partial[c * H + j];
    }
  });
  return {dx, dw};
}

// Rotates the first rot_dim dims of src [tokens, heads, D] into dst (same shape; dst may be src: each pair is
// read before it is written).
void rope_apply(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
                bool inverse) {
  const int64_t tokens = src.size(0), heads = src.size(1), rot = cos.size(1), half = rot / 2;
  const int64_t st = src.stride(0), sh = src.stride(1), dt = dst.stride(0), dh = dst.stride(1);
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  dispatch_out_type(out_type_of(src.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* xp = reinterpret_cast<const raw*>(src.data_ptr());
    raw* yp = reinterpret_cast<raw*>(dst.data_ptr());
    at::parallel_for(0, tokens * heads, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t tok = i / heads, h = i % heads;
        const raw* v = xp + tok * st + h * sh;
        raw* o = yp + tok * dt + h * dh;
        const float* ct = c + tok * rot;
        const float* stt = s + tok * rot;
        for (int64_t j = 0; j < half; ++j) {
          const RopePair p = rope_pair(to_float<T>(v[j]), to_float<T>(v[j + half]), ct[j], ct[j + half], stt[j],
                                       stt[j + half], inverse);
          o[j] = from_float<T>(p.a);
          o[j + half] = from_float<T>(p.b);
        }
      }
    });
  });
}

void rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_, const at::Tensor& sin_, bool inverse) {
  check_rope_args(q, k, cos_, sin_, /*in_place=*/true);
  at::Tensor cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  rope_apply(q, q, cos, sin, inverse);
  rope_apply(k, k, cos, sin, inverse);
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_,
                                        const at::Tensor& sin_, bool inverse) {
  check_rope_args(q, k, cos_, sin_, /*in_place=*/false);
  at::Tensor cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  at::Tensor qo = rope_output(q, cos.size(1)), ko = rope_output(k, cos.size(1));
  rope_apply(q, qo, cos, sin, inverse);
  rope_apply(k, ko, cos, sin, inverse);
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("rope_", &rope_);
  m.impl("rope", &rope);
}

}  // namespace sloth::cpu
