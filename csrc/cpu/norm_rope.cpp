// CPU kernels for RMSNorm (forward / backward) and in-place RoPE. Math: csrc/include/sloth/norm_rope.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dtype_dispatch.h"
#include "sloth/norm_rope.h"
#include "sloth/numeric.h"

namespace sloth::cpu {
namespace {

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2, "sloth.", op, ": x must be [rows, H], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "sloth.", op, ": weight must be [", x.size(1),
              "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "sloth.", op, ": weight and x must have one dtype, got ",
              weight.scalar_type(), " and ", x.scalar_type());
}

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
  check_norm_args(x_, w_, "rms_norm_backward");
  TORCH_CHECK(dy_.sizes() == x_.sizes() && dy_.scalar_type() == x_.scalar_type(),
              "sloth.rms_norm_backward: dy must match x in shape and dtype");
  TORCH_CHECK(rstd_.numel() == x_.size(0) && rstd_.scalar_type() == at::kFloat,
              "sloth.rms_norm_backward: rstd must be [rows] float32");
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

void rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const int64_t tokens = x.size(0), heads = x.size(1), rot = cos.size(1), half = rot / 2;
  const int64_t st = x.stride(0), sh = x.stride(1);
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  dispatch_out_type(out_type_of(x.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    raw* xp = reinterpret_cast<raw*>(x.data_ptr());
    at::parallel_for(0, tokens * heads, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t tok = i / heads, h = i % heads;
        raw* v = xp + tok * st + h * sh;
        const float* ct = c + tok * rot;
        const float* stt = s + tok * rot;
        for (int64_t j = 0; j < half; ++j) {
          const RopePair p = rope_pair(to_float<T>(v[j]), to_float<T>(v[j + half]), ct[j], ct[j + half], stt[j],
                                       stt[j + half], inverse);
          v[j] = from_float<T>(p.a);
          v[j + half] = from_float<T>(p.b);
        }
      }
    });
  });
}

void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "sloth.rope_: q and k must be [tokens, heads, D]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "sloth.rope_: q ", q.sizes(), " and k ", k.sizes(),
              " must share tokens and head_dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "sloth.rope_: q and k must have one dtype");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "sloth.rope_: the last dim of q and k must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0),
              "sloth.rope_: cos and sin must be [tokens, rot_dim]");
  TORCH_CHECK(cos.size(1) % 2 == 0 && cos.size(1) <= q.size(2), "sloth.rope_: rot_dim must be even and <= head_dim");
}

void rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_, const at::Tensor& sin_, bool inverse) {
  check_rope(q, k, cos_, sin_);
  at::Tensor cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  rope_apply(q, cos, sin, inverse);
  rope_apply(k, cos, sin, inverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("rope_", &rope_);
}

}  // namespace sloth::cpu
