// CPU kernels of the MoE ops: routing, counting-sort permute, grouped GEMM over dense / NF4 / MXFP4 expert
// stacks (one expert decoded at a time, never the whole [E, out, in] stack) with bias, LoRA and GLU epilogue,
// the weighted combine, its backward, and the GLU backward. Semantics: python/sloth/reference/moe.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dtype_dispatch.h"
#include "moe_checks.h"
#include "sloth/moe.h"

namespace sloth::cpu {
namespace {

// weights [T, k] fp32 and ids [T, k] int64 of logits [T, E]; kind 0: softmax then top-k (renormalize: divide
// by the k weights' sum), kind 1: top-k of the logits then softmax over them. Ties go to the lower index.
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits_, int64_t top_k, int64_t kind,
                                             bool renormalize) {
  moe_check_route(logits_, top_k, kind);
  const int64_t T = logits_.size(0), E = logits_.size(1);
  at::Tensor logits = logits_.to(at::kFloat).contiguous();
  at::Tensor weights = at::empty({T, top_k}, logits.options());
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  const float* z = logits.data_ptr<float>();
  float* w = weights.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> score(E);
    for (int64_t t = t0; t < t1; ++t) {
      const float* zt = z + t * E;
      float m = -INFINITY;
      for (int64_t e = 0; e < E; ++e) m = fmaxf(m, zt[e]);
      float sum = 0.0f;
      if (kind == 0) {
        for (int64_t e = 0; e < E; ++e) sum += (score[e] = expf(zt[e] - m));
        for (int64_t e = 0; e < E; ++e) score[e] /= sum;
      } else {
        for (int64_t e = 0; e < E; ++e) score[e] = zt[e];
      }
      float* wt = w + t * top_k;
      int64_t* it = id + t * top_k;
      int64_t n = 0;  // insertion into a sorted list of the k best; strict > keeps the lower index on ties
      for (int64_t e = 0; e < E; ++e) {
        const float v = score[e];
        if (n == top_k && !(v > wt[n - 1])) continue;
        int64_t p = n < top_k ? n++ : top_k - 1;
        while (p > 0 && v > wt[p - 1]) {
          wt[p] = wt[p - 1];
          it[p] = it[p - 1];
          --p;
        }
        wt[p] = v;
        it[p] = e;
      }
      if (kind == 1) {
        float s = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) s += (wt[j] = expf(wt[j] - score[it[0]]));
        for (int64_t j = 0; j < top_k; ++j) wt[j] /= s;
      } else if (renormalize) {
        float s = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) s += wt[j];
        for (int64_t j = 0; j < top_k; ++j) wt[j] /= s;
      }
    }
  });
  return {weights, ids};
}

// Stable counting sort of the T * k slots by expert: (sorted_slots [R], slot_pos [R], offsets [E + 1]) int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& ids_, int64_t num_experts) {
  moe_check_permute(ids_, num_experts);
  at::Tensor ids = ids_.to(at::kLong).contiguous().reshape(-1);
  const int64_t R = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  auto opts = ids.options().dtype(at::kInt);
  at::Tensor sorted = at::empty({R}, opts), pos = at::empty({R}, opts), offsets = at::zeros({num_experts + 1}, opts);
  int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t i = 0; i < R; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < num_experts, "sloth.moe_permute: expert id ", id[i], " at slot ", i,
                " is outside [0, num_experts = ", num_experts, ")");
    ++off[id[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) off[e + 1] += off[e];
  std::vector<int32_t> fill(off, off + num_experts);
  int32_t* s = sorted.data_ptr<int32_t>();
  int32_t* p = pos.data_ptr<int32_t>();
  for (int64_t i = 0; i < R; ++i) {
    const int32_t r = fill[id[i]]++;
    s[r] = (int32_t)i;
    p[i] = r;
  }
  return {sorted, pos, offsets};
}

void check_offsets_values(const at::Tensor& offsets, int64_t R, const char* op) {
  const int32_t* o = offsets.data_ptr<int32_t>();
  const int64_t E = offsets.numel() - 1;
  TORCH_CHECK(o[0] == 0 && o[E] == R, "sloth.", op, ": offsets must run from 0 to the row count ", R, ", got ", o[0],
              " .. ", o[E]);
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(o[e] <= o[e + 1], "sloth.", op, ": offsets must be non-decreasing (offsets[", e, "] = ", o[e],
                " > offsets[", e + 1, "] = ", o[e + 1], ")");
}

// Grouped GEMM: for each expert e and row r in [offsets[e], offsets[e + 1]), with x_r = x[rows[r]] (or x[r]),
//   pre_r = x_r W_e^T (trans: x_r W_e) + bias[e] + scaling * lora_t[r] lora_B[e]^T,   out_r = glu(pre_r).
// W_e is decoded into a [A, B] fp32 buffer one expert at a time (rounded to x's dtype, as the GPU kernel feeds
// its tensor cores), then one fp32 GEMM per expert. Returns (out [R, Nout], pre [R, N] or [0]).
std::tuple<at::Tensor, at::Tensor> moe_grouped_gemm(
    const at::Tensor& x_, const std::optional<at::Tensor>& rows_, const at::Tensor& offsets_, int64_t fmt,
    const at::Tensor& w_, const std::optional<at::Tensor>& scale_, const std::optional<at::Tensor>& code2_,
    const std::optional<at::Tensor>& absmax2_, const std::optional<at::Tensor>& dq_offset_, at::IntArrayRef wshape,
    int64_t blocksize, int64_t blocksize2, bool trans, const std::optional<at::Tensor>& bias_,
    const std::optional<at::Tensor>& lora_t_, const std::optional<at::Tensor>& lora_B_, double scaling, int64_t glu,
    double alpha, double limit, bool return_pre) {
  const char* op = "moe_grouped_gemm";
  at::Tensor x = x_.contiguous(), offsets = offsets_.contiguous();
  at::Tensor w = fmt == kMoeDense ? w_ : w_.contiguous();
  auto rows = contiguous(rows_), scale = contiguous(scale_), code2 = contiguous(code2_);
  auto absmax2 = contiguous(absmax2_), dq_offset = contiguous(dq_offset_), lora_t = contiguous(lora_t_),
       lora_B = contiguous(lora_B_);
  std::optional<at::Tensor> bias;
  if (bias_) bias = bias_->to(at::kFloat).contiguous();
  MoeWeight wv = moe_weight_view(fmt, w, scale, code2, absmax2, dq_offset, wshape, blocksize, blocksize2, op);
  MoeGemmShape s = moe_check_gemm(x, rows, offsets, wv, trans, bias, lora_t, lora_B, glu, op);
  check_offsets_values(offsets, s.R, op);
  if (rows) {
    const int32_t* rp = rows->data_ptr<int32_t>();
    for (int64_t r = 0; r < s.R; ++r)
      TORCH_CHECK(rp[r] >= 0 && rp[r] < x.size(0), "sloth.", op, ": rows[", r, "] = ", rp[r], " is outside x's ",
                  x.size(0), " rows");
  }
  at::Tensor out = at::empty({s.R, s.Nout}, x.options());
  at::Tensor pre = at::empty({(glu && return_pre) ? s.R : 0, s.N}, x.options());
  const int32_t* off = offsets.data_ptr<int32_t>();
  const at::ScalarType round_to = x.scalar_type();
  for (int64_t e = 0; e < wv.E; ++e) {
    const int64_t lo = off[e], hi = off[e + 1];
    if (lo == hi) continue;
    at::Tensor ws;  // [A, B] fp32
    if (fmt == kMoeDense) {
      ws = w.select(0, e).to(at::kFloat);
    } else {
      ws = at::empty({wv.A, wv.B}, x.options().dtype(at::kFloat));
      float* p = ws.data_ptr<float>();
      at::parallel_for(0, wv.A, 16, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a)
          for (int64_t b = 0; b < wv.B; ++b) p[a * wv.B + b] = moe_weight_at(wv, e, a, b);
      });
      if (round_to != at::kFloat) ws = ws.to(round_to).to(at::kFloat);
    }
    at::Tensor xe = rows ? x.index_select(0, rows->slice(0, lo, hi)) : x.slice(0, lo, hi);
    at::Tensor y = at::mm(xe.to(at::kFloat), trans ? ws : ws.t());  // [n_e, N]
    if (bias) y.add_(bias->select(0, e));
    if (lora_t) y.add_(at::mm(lora_t->slice(0, lo, hi).to(at::kFloat), lora_B->select(0, e).to(at::kFloat).t()),
                       scaling);
    if (!glu) {
      out.slice(0, lo, hi).copy_(y);
      continue;
    }
    if (return_pre) pre.slice(0, lo, hi).copy_(y);
    at::Tensor gate, up;
    if (moe_glu_interleaved((int)glu)) {
      gate = y.slice(1, 0, s.N, 2).contiguous();
      up = y.slice(1, 1, s.N, 2).contiguous();
    } else {
      gate = y.slice(1, 0, s.Nout).contiguous();
      up = y.slice(1, s.Nout, s.N).contiguous();
    }
    at::Tensor h = at::empty_like(gate);
    const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    for (int64_t i = 0; i < h.numel(); ++i) hp[i] = moe_glu_fwd((int)glu, g[i], u[i], (float)alpha, (float)limit);
    out.slice(0, lo, hi).copy_(h);
  }
  return {out, pre};
}

// d pre [R, N] of h = glu(pre) given dh [R, N / 2]; fp32 math, pre's dtype.
at::Tensor moe_glu_backward(const at::Tensor& dh_, const at::Tensor& pre_, int64_t glu, double alpha, double limit) {
  moe_check_glu_backward(dh_, pre_, glu);
  at::Tensor dh = dh_.to(at::kFloat).contiguous(), pre = pre_.to(at::kFloat).contiguous();
  const int64_t R = pre.size(0), I = dh.size(1);
  at::Tensor dpre = at::empty({R, 2 * I}, pre.options());
  const float *d = dh.data_ptr<float>(), *p = pre.data_ptr<float>();
  float* o = dpre.data_ptr<float>();
  const bool inter = moe_glu_interleaved((int)glu);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < I; ++j) {
        const int64_t gi = r * 2 * I + (inter ? 2 * j : j), ui = r * 2 * I + (inter ? 2 * j + 1 : I + j);
        moe_glu_bwd((int)glu, d[r * I + j], p[gi], p[ui], (float)alpha, (float)limit, o + gi, o + ui);
      }
  });
  return dpre.to(pre_.scalar_type());
}

// out [T, H] = sum_j weights[t, j] * y[slot_pos[t * k + j]] (weights None: 1), fp32 sums, y's dtype.
at::Tensor moe_combine(const at::Tensor& y_, const at::Tensor& slot_pos_, const std::optional<at::Tensor>& weights_,
                       int64_t top_k) {
  moe_check_combine(y_, slot_pos_, weights_, top_k);
  const int64_t S = slot_pos_.numel(), T = S / top_k, H = y_.size(1), R = y_.size(0);
  at::Tensor y = y_.to(at::kFloat).contiguous(), sp = slot_pos_.contiguous();
  std::optional<at::Tensor> w;
  if (weights_) w = weights_->to(at::kFloat).contiguous();
  const int32_t* p = sp.data_ptr<int32_t>();
  for (int64_t i = 0; i < S; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < R, "sloth.moe_combine: slot_pos[", i, "] = ", p[i], " outside [0, ", R, ")");
  at::Tensor out = at::zeros({T, H}, y.options());
  const float* yp = y.data_ptr<float>();
  const float* wp = w ? w->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < top_k; ++j) {
        const float c = wp ? wp[t * top_k + j] : 1.0f;
        const float* src = yp + (int64_t)p[t * top_k + j] * H;
        for (int64_t h = 0; h < H; ++h) o[t * H + h] += c * src[h];
      }
  });
  return out.to(y_.scalar_type());
}

// Backward of moe_combine: dy [R, H] (y's dtype), dy[r] = weights[s] * dout[s / k] with s = sorted_slots[r],
// and dweights [T, k] fp32 = <dout[t], y[slot_pos[t * k + j]]>.
std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor& dout_, const at::Tensor& y_,
                                                        const at::Tensor& sorted_slots_, const at::Tensor& slot_pos_,
                                                        const at::Tensor& weights_) {
  moe_check_combine_backward(dout_, y_, sorted_slots_, slot_pos_, weights_);
  const int64_t R = y_.size(0), H = y_.size(1), top_k = weights_.size(-1);
  at::Tensor dout = dout_.to(at::kFloat).contiguous(), y = y_.to(at::kFloat).contiguous(),
             w = weights_.to(at::kFloat).contiguous(), ss = sorted_slots_.contiguous(), sp = slot_pos_.contiguous();
  at::Tensor dy = at::empty({R, H}, y.options()), dw = at::empty({R}, y.options());
  const float *d = dout.data_ptr<float>(), *yp = y.data_ptr<float>(), *wp = w.data_ptr<float>();
  const int32_t *s = ss.data_ptr<int32_t>(), *p = sp.data_ptr<int32_t>();
  float *dyp = dy.data_ptr<float>(), *dwp = dw.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r: a sorted row for dy, a slot for dweights (both run over R)
      const int64_t slot = s[r], t = slot / top_k;
      for (int64_t h = 0; h < H; ++h) dyp[r * H + h] = wp[slot] * d[t * H + h];
      const float* yr = yp + (int64_t)p[r] * H;
      float acc = 0.0f;
      for (int64_t h = 0; h < H; ++h) acc += d[(r / top_k) * H + h] * yr[h];
      dwp[r] = acc;
    }
  });
  return {dy.to(y_.scalar_type()), dw.reshape(weights_.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sloth, CPU, m) {
  m.impl("moe_route", &moe_route);
  m.impl("moe_permute", &moe_permute);
  m.impl("moe_grouped_gemm", &moe_grouped_gemm);
  m.impl("moe_glu_backward", &moe_glu_backward);
  m.impl("moe_combine", &moe_combine);
  m.impl("moe_combine_backward", &moe_combine_backward);
}

}  // namespace sloth::cpu
