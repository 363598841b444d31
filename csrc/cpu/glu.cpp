// CPU kernels for the fused GLU activations (SwiGLU / GeGLU): forward and in-place backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sloth/glu.h"
#include "sloth/numeric.h"
#include "sloth/op_checks.h"

namespace sloth::cpu {
namespace {

at::Tensor glu_forward(const at::Tensor& gate_, const at::Tensor& up_, int64_t kind) {
  check_glu_forward_args(gate_, up_, kind);
  at::Tensor gate = gate_.contiguous(), up = up_.contiguous();
  at::Tensor out = at::empty_like(gate);
  const int64_t n = gate.numel();
  dispatch_out_type(out_type_of(gate.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* g = reinterpret_cast<const raw*>(gate.data_ptr());
    const raw* u = reinterpret_cast<const raw*>(up.data_ptr());
    raw* o = reinterpret_cast<raw*>(out.data_ptr());
    const bool ok = dispatch_glu_kind((int)kind, [&](auto k) {
      constexpr GluKind K = decltype(k)::value;
      at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) o[i] = from_float<T>(glu_fwd<K>(to_float<T>(g[i]), to_float<T>(u[i])));
      });
    });
    TORCH_CHECK(ok, "sloth.glu_forward: kind must be 0 (SwiGLU), 1 (GeGLU tanh) or 2 (GeGLU erf), got ", kind);
  });
  return out;
}

void glu_backward(const at::Tensor& grad_, const at::Tensor& gate, const at::Tensor& up, int64_t kind) {
  check_glu_backward_args(grad_, gate, up, kind);
  at::Tensor grad = grad_.contiguous();
  const int64_t n = gate.numel();
  dispatch_out_type(out_type_of(gate.scalar_type()), [&](auto t) {
    constexpr OutType T = decltype(t)::value;
    using raw = typename OutStorage<T>::type;
    const raw* dh = reinterpret_cast<const raw*>(grad.data_ptr());
    raw* g = reinterpret_cast<raw*>(gate.data_ptr());
    raw* u = reinterpret_cast<raw*>(up.data_ptr());
    const bool ok = dispatch_glu_kind((int)kind, [&](auto k) {
      constexpr GluKind K = decltype(k)::value;
      at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const float d = to_float<T>(dh[i]), gv = to_float<T>(g[i]), uv = to_float<T>(u[i]);
          const GluGrad a = glu_act<K>(gv);
          g[i] = from_float<T>(d * uv * a.dact);
          u[i] = from_float<T>(d * a.act);
        }
      });
    });
    TORCH_CHECK(ok, "sloth.glu_backward: kind must be 0 (SwiGLU), 1 (GeGLU tanh) or 2 (GeGLU erf), got ", kind);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("glu_forward", &glu_forward);
  m.impl("glu_backward", &glu_backward);
}

}  // namespace sloth::cpu
